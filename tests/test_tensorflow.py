"""The TensorFlow / Keras 3 adapter against a real coordinator and agent (gRPC), on file and S3.

Restores happen in fresh processes where it matters: a new process builds the same model
with new random weights, loads, and must predict and train on exactly as the process
that saved would have. The same module is the child's code (``python -c "import
test_tensorflow; test_tensorflow.child_main(...)"``), so both sides build identical models.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import pathlib
import socket
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import layervault as lv
from layervault.agent.server import start_agent
from layervault.agent.storage import open_store
from layervault.client import AgentClient
from layervault.tensorflow import CheckpointCallback, ModelManager, OptimizerManager
from layervault.tensorflow.variables import model_variables, optimizer_variables

from services import start_in_process

TESTS = pathlib.Path(__file__).resolve().parent


def _two_logical_cpus() -> None:
    """MirroredStrategy needs two devices; split the CPU before TensorFlow initialises it."""
    try:
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    except RuntimeError:  # already initialised (another module touched TensorFlow first)
        pass


_two_logical_cpus()


# -- models: built the same way in the test process and in the fresh child process -------------------

def functional_model(narrow_dtype: str = "bfloat16") -> keras.Model:
    """Dense + BatchNorm (moving statistics) + Dropout (seed state, int64) + a bfloat16 layer."""
    inputs = keras.Input((16,), name="features")
    x = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    x = keras.layers.BatchNormalization(name="norm")(x)
    x = keras.layers.Dropout(0.25, name="drop")(x)
    x = keras.layers.Dense(8, name="narrow", dtype=narrow_dtype)(x)
    outputs = keras.layers.Dense(4, name="head")(keras.layers.Activation("linear", dtype="float32", name="cast")(x))
    model = keras.Model(inputs, outputs, name="small")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")  # graph mode: the optimizer builds while tracing
    return model


class Residual(keras.Model):
    def __init__(self, width: int = 24, **kwargs) -> None:
        super().__init__(name="net", **kwargs)
        self.embed = keras.layers.Dense(width, name="embed")
        self.blocks = [keras.layers.Dense(width, activation="gelu", name=f"block{i}") for i in range(2)]
        self.norm = keras.layers.LayerNormalization(name="ln")
        self.drop = keras.layers.Dropout(0.1, name="drop")
        self.head = keras.layers.Dense(4, name="out")

    def call(self, x, training=False):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.drop(self.norm(h), training=training))


def subclassed_model(width: int = 24) -> keras.Model:
    model = Residual(width)
    model(np.zeros((1, 16), np.float32))  # subclassed models have variables once called
    model.compile(optimizer=keras.optimizers.AdamW(5e-3, weight_decay=0.05), loss="mse", run_eagerly=True)
    return model


def resnet50() -> keras.Model:
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    # eager: on CPU with 32x32 inputs one eager step takes ~1 s, tracing the train function ~15 s
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", run_eagerly=True)
    return model


BUILDERS = {"functional": functional_model, "subclassed": subclassed_model, "resnet50": resnet50}


def batch(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "resnet50":
        return rng.normal(size=(2, 32, 32, 3)).astype(np.float32), np.array([1, 7])
    return rng.normal(size=(16, 16)).astype(np.float32), rng.normal(size=(16, 4)).astype(np.float32)


def child_main(spec_json: str) -> None:
    """Fresh process: build the model, load model and optimizer, predict, train one step, write results."""
    spec = json.loads(spec_json)
    model = BUILDERS[spec["kind"]]()
    client = AgentClient(spec["agent"])
    mm = ModelManager(lv.ModelConfig(job=spec["job"], name=spec["kind"]), agent=client)
    om = OptimizerManager(lv.OptimizerConfig(job=spec["job"], name="adam"), agent=client)
    assert not model.optimizer.built
    mm.load(model, step=spec["step"])
    if spec["optimizer_with_model"]:
        om.load(model.optimizer, step=spec["step"], model=model)
        assert model.optimizer.built
    else:
        om.load(model.optimizer, step=spec["step"])  # not built yet: assigned when Keras builds it
    x, y = batch(spec["kind"])
    prediction = model.predict(x, verbose=0)
    loss = model.train_on_batch(x, y)
    np.savez(spec["out"], prediction=prediction, loss=np.float64(loss), iterations=int(model.optimizer.iterations.numpy()))


def run_child(function: str, spec: dict, timeout: float = 240) -> None:
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_tensorflow as t; t.{function}(sys.argv[1])"
    result = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]


# -- fixtures and helpers --------------------------------------------------------------------------------

@pytest.fixture
def services(store_url):
    running = start_in_process(store_url)
    yield running
    running.stop()


def managers(services, job: str = "keras-7", shared_memory: bool = True, **config):
    client = AgentClient(services.agent_address, shared_memory=shared_memory)
    mm = ModelManager(lv.ModelConfig(job=job, name=config.pop("name", "small"), **config), agent=client)
    om = OptimizerManager(lv.OptimizerConfig(job=job, name="adam"), agent=client)
    return mm, om


def values(named: dict) -> dict[str, np.ndarray]:
    """Snapshot of model_variables(...) / optimizer_variables(...)."""
    return {name: np.array(v.numpy()) for name, v in named.items()}


def assert_same_values(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def train(model: keras.Model, kind: str, steps: int) -> list[float]:
    x, y = batch(kind)
    return [float(model.train_on_batch(x, y)) for _ in range(steps)]


def check_fresh_process_resume(services, tmp_path, kind: str, model: keras.Model, step: int, optimizer_with_model: bool):
    """Save ``model`` now, continue one step here, and check a fresh process continues identically."""
    mm, om = managers(services, name=kind)
    mm.save(model, step=step, epoch=1).wait(120)
    om.save(model.optimizer).wait(120)  # step from optimizer.iterations
    x, y = batch(kind)
    expected_prediction = model.predict(x, verbose=0)
    expected_loss = model.train_on_batch(x, y)
    out = tmp_path / "child.npz"
    run_child("child_main", {"kind": kind, "agent": services.agent_address, "job": "keras-7", "step": step,
                             "out": str(out), "optimizer_with_model": optimizer_with_model})
    got = np.load(out)
    assert got["prediction"].tobytes() == expected_prediction.tobytes()
    assert float(got["loss"]) == float(expected_loss)
    assert int(got["iterations"]) == step + 1


# -- fresh-process round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,optimizer_with_model", [("functional", False), ("subclassed", True)])
def test_fresh_process_predicts_and_trains_on_identically(services, tmp_path, kind, optimizer_with_model):
    model = BUILDERS[kind]()
    train(model, kind, 3)
    check_fresh_process_resume(services, tmp_path, kind, model, step=3, optimizer_with_model=optimizer_with_model)


@pytest.fixture(scope="module")
def trained_resnet():
    """ResNet50 from scratch after two steps, trained once for both backends; with a snapshot to rewind to."""
    model = resnet50()
    train(model, "resnet50", 2)
    snapshot = {id(v): np.array(v.numpy()) for v in [*model.variables, *model.optimizer.variables]}
    return model, snapshot


@pytest.mark.slow
def test_resnet50_fresh_process_predicts_and_trains_on_identically(services, tmp_path, trained_resnet):
    model, snapshot = trained_resnet
    for v in [*model.variables, *model.optimizer.variables]:  # rewind: the other backend's run took a step
        v.assign(snapshot[id(v)])
    check_fresh_process_resume(services, tmp_path, "resnet50", model, step=2, optimizer_with_model=False)
    mm, _ = managers(services, name="resnet50")
    manifest = mm.client.resolve("keras-7", "model", {"step": "2"})
    assert len(manifest.shards) == len(model.variables) == 320
    kernel = model.get_layer("conv1_conv").kernel
    assert mm.load_layer("conv1_conv/kernel", epoch=1).tobytes() == snapshot[id(kernel)].tobytes()


# -- manifest, keys, single layers -------------------------------------------------------------------------

def test_manifest_is_framework_neutral_and_records_the_optimizer(services):
    model = functional_model()
    train(model, "functional", 2)
    mm, om = managers(services, additional={"version": "2"})
    mm.save(model, step=10, epoch=1).wait(60)
    om.save(model.optimizer, loss=0.5).wait(60)  # step 2 from optimizer.iterations
    manifest = mm.client.resolve("keras-7", "model", {"epoch": "1"})
    assert manifest.step == 10 and manifest.world_size == 1
    assert manifest.config.framework == "tensorflow" and manifest.config.name == "small"
    assert dict(manifest.config.additional) == {"version": "2"}
    layouts = {s.name: s.layout for s in manifest.shards}
    assert set(layouts) == {"hidden/kernel", "hidden/bias", "norm/gamma", "norm/beta", "norm/moving_mean",
                            "norm/moving_variance", "drop/seed_generator_state", "narrow/kernel", "narrow/bias",
                            "head/kernel", "head/bias"}
    assert (layouts["hidden/kernel"].dtype, list(layouts["hidden/kernel"].global_shape)) == ("float32", [16, 32])
    assert layouts["narrow/kernel"].dtype == "bfloat16" and layouts["drop/seed_generator_state"].dtype == "int64"
    assert all(list(layout.offsets) == [0] * len(layout.global_shape) and layout.local_shape == layout.global_shape
               for layout in layouts.values())

    opt = om.client.resolve("keras-7", "optimizer", {})
    assert opt.step == 2 and opt.config.framework == "tensorflow"
    names = {s.name for s in opt.shards}
    assert {"iteration", "learning_rate", "hidden_kernel_momentum", "narrow_kernel_velocity"} <= names
    config = json.loads(opt.extra["tensorflow.optimizer.config"])
    assert config["beta_1"] == 0.9 and config["learning_rate"] == pytest.approx(1e-2)
    assert opt.extra["tensorflow.optimizer.class"] == "Adam"
    assert om.hyper_parameters(loss=0.5) == config
    assert keras.optimizers.Adam.from_config(om.hyper_parameters()).beta_2 == 0.999
    assert [c.step for c in mm.checkpoints()] == [10] and mm.checkpoints()[0].keys == {"step": 10, "epoch": 1}


def test_load_layer_fetches_only_that_layer(services):
    inputs = keras.Input((512,))
    x = keras.layers.Dense(512, name="wide0")(inputs)
    x = keras.layers.Dense(512, name="wide1")(x)
    model = keras.Model(inputs, keras.layers.Dense(512, name="wide2")(x), name="wide")
    mm, _ = managers(services)  # 1 MiB per kernel, 1 MiB chunks
    mm.save(model, step=1).wait(60)
    manifest = mm.client.resolve("keras-7", "model", {"step": "1"})
    shard = next(s for s in manifest.shards if s.name == "wide1/kernel")
    before = services.agent.service.store.stats.snapshot()
    array = mm.load_layer("wide1/kernel", step=1)
    after = services.agent.service.store.stats.snapshot()
    assert isinstance(array, np.ndarray) and array.dtype == np.float32 and array.shape == (512, 512)
    assert array.tobytes() == model.get_layer("wide1").kernel.numpy().tobytes()
    assert after["gets"] - before["gets"] == len(shard.chunks)
    assert after["get_bytes"] - before["get_bytes"] == shard.stored_bytes
    assert shard.stored_bytes < sum(s.stored_bytes for s in manifest.shards) / 2
    with pytest.raises(lv.NotFoundError, match="no.such"):
        mm.load_layer("no.such/kernel", step=1)


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "grpc-stream"])
def test_a_mapping_of_arrays_and_variables_round_trips(services, shared_memory):
    import ml_dtypes

    state = {"counts": np.arange(10, dtype=np.int64), "scale": tf.Variable(np.float16(3.5)),
             "mask": np.array([True, False, True]), "w": np.linspace(0, 1, 12, dtype=ml_dtypes.bfloat16).reshape(3, 4)}
    mm, _ = managers(services, shared_memory=shared_memory)
    mm.save(state, step=1).wait(60)
    target = {"counts": np.zeros(10, np.int64), "scale": tf.Variable(np.float16(0)),
              "mask": np.zeros(3, bool), "w": np.zeros((3, 4), ml_dtypes.bfloat16)}
    mm.load(target, step=1)
    assert target["counts"].tolist() == list(range(10)) and float(target["scale"].numpy()) == 3.5
    assert target["mask"].tolist() == [True, False, True] and target["w"].tobytes() == state["w"].tobytes()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "grpc-stream"])
def test_background_save_hands_off_snapshots_while_training_goes_on(services, shared_memory, monkeypatch):
    import threading

    from layervault import arrays

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    mm, _ = managers(services, shared_memory=shared_memory)
    expected = values(model_variables(model))
    go = threading.Event()
    for method in ("copy_to", "read"):  # every hand-off waits until training went on
        original = getattr(arrays.ArraySource, method)
        monkeypatch.setattr(arrays.ArraySource, method, lambda self, *a, _o=original: (go.wait(30), _o(self, *a))[1])
    handles = [mm.save(model, step=1, background=True), mm.save(state, step=2, background=True)]
    model.layers[0].kernel.assign(np.ones((4, 3), np.float32))  # training goes on at once
    state["w"][...] = -1.0
    go.set()
    assert all(h.wait_staged(timeout=60) > 0 for h in handles)
    assert [h.wait(timeout=60).id.step for h in handles] == [1, 2]
    mm.load(model, step=1)
    assert_same_values(values(model_variables(model)), expected)
    target = {"w": np.zeros((3, 4), np.float32)}
    mm.load(target, step=2)
    assert target["w"].tolist() == np.arange(12, dtype=np.float32).reshape(3, 4).tolist()


# -- refusals --------------------------------------------------------------------------------------------

def test_mismatched_model_is_refused_and_left_untouched(services):
    model = functional_model()
    mm, om = managers(services)
    mm.save(model, step=1).wait(60)
    train(model, "functional", 1)
    om.save(model.optimizer).wait(60)

    other = subclassed_model(width=24)
    before = values(model_variables(other))
    with pytest.raises(lv.IncompatibleStateError) as info:
        mm.load(other, step=1)
    message = str(info.value)
    assert "nothing was loaded" in message
    assert "not in the checkpoint: net/block0/bias, net/block0/kernel" in message
    assert "not in the target: head/bias, head/kernel, hidden/bias" in message
    assert "drop/seed_generator_state" not in message  # the same name and shape in both: compared, fine
    assert_same_values(values(model_variables(other)), before)

    narrower = keras.Model(*_narrow_functional(), name="small")
    before = values(model_variables(narrower))
    with pytest.raises(lv.IncompatibleStateError, match=r"hidden/kernel: shape \[16, 32\] in the checkpoint, \[16, 8\]"):
        mm.load(narrower, step=1)
    assert_same_values(values(model_variables(narrower)), before)

    sgd = keras.optimizers.SGD()
    with pytest.raises(lv.IncompatibleStateError, match="holds Adam state, not SGD"):
        om.load(sgd, model=model)
    assert not sgd.built


def _narrow_functional():
    inputs = keras.Input((16,), name="features")
    x = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    return inputs, keras.layers.Dense(4, name="head")(x)


def test_optimizer_for_another_model_is_refused_when_keras_builds_it(services):
    model = functional_model()
    train(model, "functional", 1)
    _, om = managers(services)
    om.save(model.optimizer).wait(60)
    other = keras.Sequential([keras.Input((16,)), keras.layers.Dense(4, name="only")], name="other")
    other.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    om.load(other.optimizer)  # fetched now; checked and assigned when Keras builds the optimizer
    with pytest.raises(lv.IncompatibleStateError, match="not in the checkpoint: other_only_bias_momentum"):
        train(other, "functional", 1)
    assert int(other.optimizer.iterations.numpy()) == 0  # nothing was assigned


def test_unbuilt_model_and_unbuilt_optimizer_are_refused_with_a_hint(services):
    mm, om = managers(services)
    with pytest.raises(lv.InvalidArgumentError, match="build it first"):
        mm.save(Residual(), step=1)
    with pytest.raises(lv.InvalidArgumentError, match="never stepped"):
        om.save(keras.optimizers.Adam())


# -- other frameworks and the command line ---------------------------------------------------------------------

def test_torch_reads_what_tensorflow_saved_and_back(services):
    torch = pytest.importorskip("torch")
    from layervault.torch import ModelManager as TorchModelManager

    model = functional_model()
    train(model, "functional", 2)
    mm, _ = managers(services)
    mm.save(model, step=2).wait(60)
    client = AgentClient(services.agent_address)
    tm = TorchModelManager(lv.ModelConfig(job="keras-7", name="small"), agent=client)
    expected = {"hidden/kernel": (torch.float32, model.get_layer("hidden").kernel),
                "narrow/kernel": (torch.bfloat16, model.get_layer("narrow").kernel),
                "drop/seed_generator_state": (torch.int64, model.get_layer("drop").seed_generator.state)}
    for name, (dtype, variable) in expected.items():
        tensor = tm.load_layer(name, step=2)
        assert tensor.dtype == dtype and list(tensor.shape) == list(variable.shape), name
        assert tensor.contiguous().view(torch.uint8).numpy().tobytes() == variable.numpy().tobytes(), name

    state = {"w": torch.randn(3, 5).to(torch.bfloat16), "n": torch.arange(4, dtype=torch.int64), "h": torch.randn(2).half()}
    TorchModelManager(lv.ModelConfig(job="from-torch", name="t"), agent=client).save(state, step=1).wait(60)
    tf_mm = ModelManager(lv.ModelConfig(job="from-torch", name="t"), agent=client)
    for name, tensor in state.items():
        array = tf_mm.load_layer(name)
        assert array.dtype.name == str(tensor.dtype).removeprefix("torch.") and array.shape == tuple(tensor.shape)
        assert array.tobytes() == tensor.view(torch.uint8).numpy().tobytes()


def cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "layervault.cli", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_pull_writes_npy_through_the_agent_and_from_storage(services, store_url, tmp_path):
    model = functional_model()
    train(model, "functional", 1)
    mm, om = managers(services)
    mm.save(model, step=5).wait(60)
    om.save(model.optimizer).wait(60)
    saved = values(model_variables(model))

    env = {"LAYERVAULT_AGENT": services.agent_address}
    out = cli("pull", "keras-7", "5", "--layer", "hidden/kernel", "-o", str(tmp_path / "k.npy"), env=env).stdout
    assert "hidden/kernel" in out and "float32 [16, 32]" in out
    assert np.load(tmp_path / "k.npy").tobytes() == saved["hidden/kernel"].tobytes()
    cli("pull", "keras-7", "latest", "--kind", "optimizer", "--layer", "iteration", "-o", str(tmp_path / "it.npy"), env=env)
    assert np.load(tmp_path / "it.npy").dtype == np.int64 and int(np.load(tmp_path / "it.npy")) == 1

    services.stop()  # from here on, straight from storage
    out = cli("pull", "keras-7", "5", "--storage", store_url, "-o", str(tmp_path / "all")).stdout
    files = {p.name for p in (tmp_path / "all").iterdir()}
    assert files == {name.replace("/", "%2F") + ".npy" for name in saved}
    for name, array in saved.items():
        loaded = np.load(tmp_path / "all" / (name.replace("/", "%2F") + ".npy"))
        if array.dtype.name == "bfloat16":  # .npy has no bfloat16: widened to float32, exactly
            assert loaded.dtype == np.float32 and np.array_equal(loaded, array.astype(np.float32))
        else:
            assert loaded.dtype == array.dtype and loaded.tobytes() == array.tobytes(), name
    assert "widened to float32" in out
    missing = cli("pull", "keras-7", "5", "--storage", store_url, "--layer", "nope", "-o", str(tmp_path / "n.npy"), check=False)
    assert missing.returncode == 1 and "nope" in missing.stderr and "Traceback" not in missing.stderr


def test_assemble_places_shards_at_their_offsets():
    from layervault.arrays import ArraySink, assemble
    from layervault.proto import manifest_pb2

    whole = np.arange(12, dtype=np.float32).reshape(4, 3)
    manifest = manifest_pb2.Manifest(job="j", kind="model", step=1, world_size=2)
    sinks = {}
    for rank, (start, rows) in enumerate([(0, 3), (3, 1)]):  # uneven row shards, as DTensor makes them
        layout = manifest_pb2.TensorLayout(dtype="float32", global_shape=[4, 3], offsets=[start, 0], local_shape=[rows, 3])
        part = whole[start:start + rows]
        manifest.shards.add(name="w", layout=layout, rank=rank, raw_bytes=part.nbytes)
        sinks[rank] = ArraySink(layout)
        sinks[rank].write(0, memoryview(part.tobytes()))
    assert assemble(manifest, sinks)["w"].tobytes() == whole.tobytes()
    del sinks[1]
    with pytest.raises(lv.IncompatibleStateError, match="cover 9 of 12 elements"):
        assemble(manifest, sinks)


# -- training integration --------------------------------------------------------------------------------

def test_callback_saves_every_n_steps_and_epochs(services):
    model = functional_model()
    mm, om = managers(services)
    x, y = batch("functional")  # 16 samples, batch 4: 4 steps per epoch
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
              callbacks=[CheckpointCallback(mm, om, every_n_steps=3, every_n_epochs=1)])
    keys = [(c.step, c.keys["epoch"]) for c in mm.checkpoints()]
    assert keys == [(3, 0), (4, 1), (6, 1), (8, 2)]  # epoch = epochs completed at the save
    assert [c.step for c in om.checkpoints()] == [3, 4, 6, 8]
    fresh = functional_model()
    mm.load(fresh, epoch=2)
    assert_same_values(values(model_variables(fresh)), values(model_variables(model)))


def test_mirrored_strategy_stores_replicated_variables_once(services):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(devices) == 2, devices
    with tf.distribute.MirroredStrategy(devices).scope():  # all-reduce cannot pack bfloat16 with float32 gradients
        model = functional_model(narrow_dtype="float32")
    train(model, "functional", 2)
    assert type(model.variables[0].value).__name__ == "MirroredVariable"
    mm, om = managers(services)
    mm.save(model, step=2).wait(60)
    om.save(model.optimizer).wait(60)
    manifest = mm.client.resolve("keras-7", "model", {})
    assert manifest.world_size == 1 and len(manifest.shards) == len(model.variables)
    assert {s.rank for s in manifest.shards} == {0}

    with tf.distribute.MirroredStrategy(devices).scope():
        fresh = functional_model(narrow_dtype="float32")
    mm.load(fresh)
    om.load(fresh.optimizer, model=fresh)
    for saved, loaded in ((model_variables(model), model_variables(fresh)),
                          (optimizer_variables(model.optimizer), optimizer_variables(fresh.optimizer))):
        assert saved.keys() == loaded.keys()
        for name, variable in loaded.items():
            replicas = getattr(variable.value, "values", (variable.value,))
            assert len(replicas) == 2 or not variable.trainable, name
            for replica in replicas:  # every replica holds the loaded value
                assert replica.numpy().tobytes() == saved[name].numpy().tobytes(), name
    assert train(fresh, "functional", 1) == train(model, "functional", 1)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def worker_main(spec_json: str) -> None:
    """One MultiWorkerMirroredStrategy worker: train two steps, save through its node's agent, reload."""
    spec = json.loads(spec_json)
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": spec["workers"]},
                                          "task": {"type": "worker", "index": spec["index"]}})
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        inputs = keras.Input((16,))
        hidden = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(4, name="head")(hidden), name="mw")
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)
    x, y = batch("functional")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(16).with_options(options))

    @tf.function
    def step(batch):  # Keras 3.15's fit() cannot run under this strategy on CPU (see the report); a plain loop can
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.reduce_mean((model(x, training=True) - y) ** 2, axis=-1)) / 16.0
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss
        return strategy.reduce("SUM", strategy.run(replica_step, args=batch), axis=None)

    for _ in range(2):
        for b in data:
            step(b)
    client = AgentClient(spec["agent"])
    mm = ModelManager(lv.ModelConfig(job="mw", name="mw"), agent=client)
    om = OptimizerManager(lv.OptimizerConfig(job="mw", name="adam"), agent=client)
    mm.save(model, step=2).wait(120)
    om.save(optimizer).wait(120)
    saved = {v.path: np.array(v.numpy()) for v in [*model.variables, *optimizer.variables]}
    for v in [*model.variables, *optimizer.variables]:
        v.assign(np.zeros(v.shape, v.dtype))
    mm.load(model)
    om.load(optimizer)
    reloaded = {v.path: np.array(v.numpy()) for v in [*model.variables, *optimizer.variables]}
    np.savez(spec["out"], **{k.replace("/", "|"): v for k, v in saved.items()},
             **{"reloaded|" + k.replace("/", "|"): v for k, v in reloaded.items()})


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_two_worker_processes(tmp_path):
    running = start_in_process((tmp_path / "store").as_uri())
    second = start_agent(open_store((tmp_path / "store").as_uri()), running.coordinator.address,
                         socket_path=f"{tempfile.mkdtemp(prefix='lv-', dir='/tmp')}/agent.sock",
                         staging_bytes=64 << 20, chunk_size=1 << 20)
    try:
        workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
        code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_tensorflow as t; t.worker_main(sys.argv[1])"
        procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(
                    {"workers": workers, "index": i, "agent": agent, "out": str(tmp_path / f"w{i}.npz")})],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i, agent in enumerate([running.agent_address, second.address])]
        for proc in procs:
            output, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0, output[-4000:]
    finally:
        second.stop(grace=0)
        running.stop()
    w0, w1 = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    for key in w0.files:
        assert w0[key].tobytes() == w1[key].tobytes(), key  # in sync, and each reloaded what it saved
        if not key.startswith("reloaded|"):
            assert w0[key].tobytes() == w0["reloaded|" + key].tobytes(), key

    store = open_store((tmp_path / "store").as_uri())
    from layervault.agent.catalog import Catalog

    _, manifest = Catalog(store).resolve("mw", "model", {})
    assert manifest.world_size == 2
    assert sorted(s.name for s in manifest.shards) == ["head/bias", "head/kernel", "hidden/bias", "hidden/kernel"]
    assert {s.rank for s in manifest.shards} == {0, 1}  # each variable once, the work shared by both workers
    _, opt = Catalog(store).resolve("mw", "optimizer", {})
    assert opt.world_size == 2 and len({s.name for s in opt.shards}) == len(opt.shards)
    assert int(w0["adam|iteration"]) == 2


# -- import cost --------------------------------------------------------------------------------------------

def test_layervault_and_its_torch_adapter_do_not_import_tensorflow():
    code = ("import sys, layervault, layervault.torch, layervault.client, layervault.arrays, layervault.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
