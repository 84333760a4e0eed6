"""Several processes: ranks read disjoint shards, uneven shard counts do not hang DDP, DDP resumes
exactly, the FSDP recipe's strategy builds."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from sensorium.data.collate import Batch
from sensorium.data.shards import ShardStream, count_samples
from sensorium.data.synthetic import make_dataset
from sensorium.errors import SensoriumError
from sensorium.training.callbacks import AdapterFSDPStrategy
from tests.training.test_image_training import RECIPES, tiny_backbone_folder

REPO = Path(__file__).resolve().parents[2]
KEYS_ENV = "SENSORIUM_TEST_KEYS"


def split_shard(src: Path, out: Path, n: int) -> list[Path]:
    """Deal the samples of shard ``src`` round-robin into ``n`` shards in ``out``."""
    with tarfile.open(src) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m, _ in members))
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"shard-{i:06d}.tar" for i in range(n)]
    tars = [tarfile.open(p, "w") for p in paths]
    for m, data in members:
        tars[keys.index(m.name.split(".", 1)[0]) % n].addfile(m, io.BytesIO(data))
    for t in tars:
        t.close()
    return paths


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    """The tiny shapes set with its 40 training samples in 3 shards (14, 13, 13)."""
    root = tmp_path_factory.mktemp("ddp")
    data = make_dataset("shapes", root / "shapes", num=40, seed=0)
    (src,) = sorted((data / "train").glob("*.tar"))
    split_shard(src, root / "split", 3)
    src.unlink()
    for p in sorted((root / "split").glob("*.tar")):
        p.rename(data / "train" / p.name)
    return root, data


def _keys(ds: ShardStream) -> list[str]:
    return [k for batch in DataLoader(ds, batch_size=ds.batch_size, collate_fn=lambda b: [s["__key__"] for s in b])
            for k in batch]


# ------------------------------------------------------------------------------------ splitting
def test_ranks_read_disjoint_shards_and_resampled_ranks_have_equal_epochs(three_shards):
    _, data = three_shards
    train = data / "train"
    assert count_samples(train) == 40
    for epoch in (0, 1):
        plain = [ShardStream(train, dict, shuffle=8, seed=0, batch_size=4, rank=r, world_size=2) for r in (0, 1)]
        for ds in plain:
            ds.set_position(epoch)
        seen = [_keys(ds) for ds in plain]
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(_keys(ShardStream(train, dict)))
        assert sorted(map(len, seen)) in ([13, 27], [14, 26])  # one shard against two: uneven, so DDP needs...
        resampled = [ShardStream(train, dict, shuffle=8, seed=0, batch_size=4, rank=r, world_size=2, resampled=True,
                                 epoch_samples=20) for r in (0, 1)]
        for ds in resampled:
            ds.set_position(epoch)
        seen = [_keys(ds) for ds in resampled]
        assert [len(s) for s in seen] == [20, 20]  # ...resampled shards: every rank has the same epoch
        assert not set(seen[0]) & set(seen[1])  # still disjoint within an epoch
    # evaluation: every rank takes every other sample; the odd one out is left out so the ranks stay even
    for n in (3, 4):
        ranks = [ShardStream(train, dict, batch_size=4, rank=r, world_size=n, split="samples") for r in range(n)]
        seen = [_keys(ds) for ds in ranks]
        assert [len(s) for s in seen] == [40 // n] * n and len(set().union(*seen)) == 40 // n * n
    with pytest.raises(SensoriumError, match="3 shard.* cannot feed 4 ranks"):
        _keys(ShardStream(train, dict, resampled=True, epoch_samples=4, rank=3, world_size=4))


def test_a_batch_of_unreadable_samples_still_gives_every_parameter_a_gradient_under_ddp(tmp_path):
    """A rank whose batch is all bad must still join the gradient all-reduce (DDP waits for it otherwise)."""
    from sensorium.encoders import ImageEncoderSpec
    from sensorium.training import ImageAdapterModule

    module = ImageAdapterModule(backbone=str(tiny_backbone_folder(tmp_path / "bb")), every=1,
                                encoder=ImageEncoderSpec(name="resnet10t", image_size=32))
    empty = Batch(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long), {}, [],
                  bad=[("shard.tar", "k", "not a readable image")])
    module._trainer = SimpleNamespace(world_size=1)
    assert module.training_step(empty, 0) is None  # one process: the step is skipped
    module._trainer = SimpleNamespace(world_size=2)
    loss = module.training_step(empty, 0)
    assert loss.item() == 0.0
    loss.backward()
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and not p.grad.any() for p in trainable)


# ----------------------------------------------------------------------------------- a DDP run
class RecordKeys(L.Callback):
    """Test probe: append ``epoch key`` lines of every training batch to ``$SENSORIUM_TEST_KEYS/rank<R>.txt``."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(Path(os.environ[KEYS_ENV]) / f"rank{trainer.global_rank}.txt", "a") as f:
            for key in [*batch.keys, *(k for _, k, _ in batch.bad)]:
                f.write(f"{trainer.current_epoch} {key}\n")


def ddp_fit(tmp: Path, backbone: Path, data: Path, run: str, *extra: str) -> str:
    """The tiny image recipe on 2 CPU processes (DDP, gloo), run ``run`` under ``tmp``."""
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp / run / "checkpoints"), "every_n_train_steps": 4, "save_last": True,
                       "save_top_k": -1}},
        {"class_path": "sensorium.training.AdapterExport"},
        {"class_path": "tests.training.test_ddp.RecordKeys"},
    ]
    args = [
        "fit", "--config", str(RECIPES / "image/shapes.yaml"), "--model.backbone", str(backbone),
        "--model.encoder", json.dumps({"name": "resnet10t", "image_size": 32, "checkpoint": None}), "--model.every", "1",
        "--model.adapter_dir", str(tmp / run / "adapter"), "--data.root", str(data), "--data.synthetic", "null",
        "--data.batch_size", "4", "--data.num_workers", "0", "--data.shuffle_buffer", "8", "--trainer.max_steps", "7",
        "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp / run), "--trainer.logger.init_args.save_dir", str(tmp / run / "logs"),
        "--trainer.callbacks", json.dumps(callbacks), *extra,
    ]
    (tmp / run / "keys").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), KEYS_ENV: str(tmp / run / "keys"), "OMP_NUM_THREADS": "1"}
    # its own process group: a hung run is ended with the rank processes Lightning started for it
    p = subprocess.Popen([sys.executable, "-m", "sensorium.cli", *args], cwd=tmp, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"the DDP run hung: {out[-4000:]}")
    assert p.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def ddp_run(three_shards):
    root, data = three_shards
    backbone = tiny_backbone_folder(root / "backbone")
    ddp_fit(root, backbone, data, "straight")
    return root, backbone, data


@pytest.mark.slow  # two training processes on the CPU: 25-50 s with the shared run
def test_ddp_on_two_cpu_processes_with_three_shards(ddp_run):
    """2 ranks, 3 shards: resampled shards are switched on, both ranks run the same steps on disjoint data."""
    root, _, _ = ddp_run
    seen = {}
    for rank in (0, 1):
        per_epoch = defaultdict(list)
        for line in (root / "straight" / "keys" / f"rank{rank}.txt").read_text().split("\n")[:-1]:
            epoch, key = line.split()
            per_epoch[int(epoch)].append(key)
        seen[rank] = per_epoch
    # 40 samples / 2 ranks = 20 per rank and epoch: 5 batches of 4; 7 steps reach into the second epoch
    assert [len(seen[r][0]) for r in (0, 1)] == [20, 20] and [len(seen[r][1]) for r in (0, 1)] == [8, 8]
    for epoch in (0, 1):
        assert not set(seen[0][epoch]) & set(seen[1][epoch]), f"ranks shared samples in epoch {epoch}"
    assert (root / "straight" / "adapter" / "adapter.safetensors").is_file()
    ckpt = torch.load(root / "straight" / "checkpoints" / "epoch=0-step=4.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "samples": 16, "seed": 0, "world_size": 2}]


@pytest.mark.slow  # two training processes on the CPU: 25-50 s with the shared run
def test_ddp_resumes_to_the_same_adapter(ddp_run):
    from tests.training.test_resume import RESUME_TOLERANCE, adapter, checkpoint_for, max_diff

    root, backbone, data = ddp_run
    ckpt = checkpoint_for(root / "straight" / "checkpoints" / "epoch=0-step=4.ckpt", root, "resumed")
    ddp_fit(root, backbone, data, "resumed", "--ckpt_path", str(ckpt))
    assert max_diff(adapter(root / "straight" / "adapter"), adapter(root / "resumed" / "adapter")) <= RESUME_TOLERANCE


# ------------------------------------------------------------------------------------------- FSDP
def test_fsdp_recipe_builds_its_strategy_and_plugins():
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.fabric.plugins import CheckpointIO
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy, Strategy
    from timm.models.vision_transformer import Block
    from torch.distributed.fsdp import ShardingStrategy

    from sensorium.backbone.model import DecoderLayer
    from sensorium.training.callbacks import AtomicCheckpointIO

    recipe = yaml.safe_load((RECIPES / "image/llama3_vit_h_fsdp.yaml").read_text())
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    parser.add_argument("--plugins", type=list[CheckpointIO])
    cfg = parser.parse_object({"strategy": recipe["trainer"]["strategy"], "plugins": recipe["trainer"]["plugins"]})
    built = parser.instantiate(cfg)
    strategy = built.strategy
    assert isinstance(strategy, AdapterFSDPStrategy) and isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True and strategy.kwargs["limit_all_gathers"] is True
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {DecoderLayer, Block}
    mp = strategy.mixed_precision
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy._state_dict_type == "full"
    trainer = L.Trainer(strategy=strategy, plugins=built.plugins, accelerator="cpu", devices=1,
                        precision=recipe["trainer"]["precision"], logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert isinstance(trainer.precision_plugin, FSDPPrecision)
    assert recipe["data"]["init_args"]["resampled"] is True


def test_under_fsdp_the_module_keeps_one_dtype_and_clips_through_the_sharded_root(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    from sensorium.encoders import ImageEncoderSpec
    from sensorium.training import ImageAdapterModule

    module = ImageAdapterModule(backbone=str(tiny_backbone_folder(tmp_path / "bb")), every=1,
                                encoder=ImageEncoderSpec(name="resnet10t", image_size=32))
    module.model.backbone.to(torch.bfloat16)  # as a bf16 checkpoint loads
    clipped = []
    root = SimpleNamespace(clip_grad_norm_=clipped.append)
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))
    module.configure_model()  # not FSDP: nothing changes
    assert module.model.backbone.embed_tokens.weight.dtype == torch.bfloat16
    fsdp = FSDPStrategy()
    fsdp.model = root
    module._trainer = SimpleNamespace(strategy=fsdp)
    module.configure_model()
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    module.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert clipped == [1.0]


class CPUFSDP(AdapterFSDPStrategy):
    """Test only: torch's FSDP runs on CPU processes (gloo) when given the CPU as its device, which
    Lightning's FSDPStrategy never passes (it asks for a GPU); this subclass of the recipe's strategy does."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


@pytest.mark.slow  # two training processes on the CPU: 25-50 s with the shared run
def test_fsdp_on_two_cpu_processes_trains_like_ddp(ddp_run):
    """The recipe's FSDP set-up (wrapped decoder layers, use_orig_params, norm clipping through the sharded
    root, adapter gathered for export, trainable-only checkpoints) trains as DDP does, up to float rounding."""
    from tests.training.test_resume import adapter, max_diff

    root, backbone, data = ddp_run
    strategy = {"class_path": "tests.training.test_ddp.CPUFSDP", "init_args": {"param_dtype": "float32"}}
    ddp_fit(root, backbone, data, "fsdp", "--trainer.strategy", json.dumps(strategy), "--trainer.precision", "32-true")
    diff = max_diff(adapter(root / "straight" / "adapter"), adapter(root / "fsdp" / "adapter"))
    assert diff < 1e-6, diff  # measured: 1.5e-8
    ckpt = torch.load(root / "fsdp" / "checkpoints" / "epoch=0-step=4.ckpt", map_location="cpu", weights_only=True)
    ddp = torch.load(root / "straight" / "checkpoints" / "epoch=0-step=4.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"].keys() == ddp["state_dict"].keys()
    assert all(k.startswith("model.adapters.image.") for k in ckpt["state_dict"])
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "samples": 16, "seed": 0, "world_size": 2}]
