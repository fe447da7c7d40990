"""The layervault node agent and coordinator (``import layervault.agent``)."""
