"""MPipeMoEStrategy: registry, argument mapping, early errors, checkpoint resharding (in
process), and the distributed runs against single-process training (gloo, spawn).

The distributed runs train `TinyMoELM` (two MoE layers of 4 experts, top-2, SGD with
momentum, gradient clipping by norm) for 5 optimizer steps on a global batch of 4 sequences
and compare every step's loss and the final parameters with one process training on the
same global batches (`strategy_models.reference_run`), within 1e-5. SGD with momentum and
clipping make an error in the expert-gradient averaging (e.g. EP-size scaling) or in the
clipping norm show; Adam would hide a uniform scale.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

from lightning_mpipemoe.atomic_dir import commit_directory, remove_stale, temporary_directory
from lightning_mpipemoe.checkpointing import (
    META_FILE,
    SECTION,
    assemble_checkpoint,
    consolidate_checkpoint,
    needed_shards,
    optimizer_state_by_index,
    optimizer_state_by_name,
    shard_file,
    split_checkpoint,
)
from lightning_mpipemoe.config import SimulatedLink, executor_overrides
from lightning_mpipemoe.spawn_launcher import MPipeMoESpawnLauncher, hosted_rendezvous
from lightning_mpipemoe.strategy import MPipeMoEStrategy
from tests.strategy_models import (
    CLIP,
    GLOBAL_BATCH,
    HPARAMS,
    STEPS,
    DumpState,
    KillDuringSave,
    LossRecorder,
    ReplicasStartApart,
    SaveAt,
    TinyMoELM,
    loader,
    read_losses,
    reference_run,
)

TOL = 1e-5
TEST_TIMEOUT = timedelta(seconds=60)


def _trainer(devices: int, strategy, root: Path, *, callbacks=(), plugins=None, max_steps: int = STEPS, **kwargs):
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        gradient_clip_val=CLIP,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=list(callbacks),
        plugins=plugins,
        **kwargs,
    )


def _assert_state_close(state: dict, expected: dict, what: str) -> None:
    assert set(state) == set(expected), f"{what}: keys differ: {sorted(set(state) ^ set(expected))}"
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, atol=TOL, rtol=0, msg=lambda m: f"{what} {key}: {m}")


def _assert_losses_close(losses: dict[int, float], expected: list[float], steps) -> None:
    assert sorted(losses) == list(steps), losses
    for step in steps:
        assert abs(losses[step] - expected[step - 1]) <= TOL, (step, losses[step], expected[step - 1])


@pytest.fixture(scope="module")
def reference():
    out = reference_run(HPARAMS, clip=CLIP)
    clipped = [norm > CLIP for norm in out["norms"]]
    assert any(clipped) and not all(clipped), f"CLIP={CLIP} should clip some steps only; norms {out['norms']}"
    return out


# ----------------------------------------------------------------------------- registry & args


def test_registry_names_and_init_params():
    for name, start_method in (("mpipemoe", "popen"), ("mpipemoe_spawn", "spawn")):
        entry = StrategyRegistry[name]
        assert entry["strategy"] is MPipeMoEStrategy
        assert entry["init_params"] == {"start_method": start_method}
        assert isinstance(StrategyRegistry.get(name), MPipeMoEStrategy)
    popen = pl.Trainer(accelerator="cpu", devices=2, strategy="mpipemoe", logger=False)
    assert isinstance(popen.strategy, MPipeMoEStrategy)
    assert isinstance(popen.strategy.launcher, _SubprocessScriptLauncher)
    assert popen.strategy.expert_parallel_size == 2  # default: the devices of one node
    spawn = pl.Trainer(accelerator="cpu", devices=2, num_nodes=1, strategy="mpipemoe_spawn", logger=False)
    assert isinstance(spawn.strategy.launcher, MPipeMoESpawnLauncher)


def test_spawn_launch_rendezvous_through_a_store_the_launcher_holds(monkeypatch):
    """Each `mpipemoe_spawn` launch hosts its workers' store on a port the OS assigned and that
    stays bound (no free port picked, released and bound again by rank 0: EADDRINUSE), the
    workers connect as clients, and the environment is restored afterwards (a later launch
    must not reuse the closed port). A `MASTER_PORT` of the user's is left to Lightning."""
    for name in ("MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    strategy = pl.Trainer(accelerator="cpu", devices=2, strategy="mpipemoe_spawn", logger=False).strategy
    ports = []
    for _ in range(2):  # two launches of one trainer (fit, then test): a fresh store each
        with hosted_rendezvous(strategy):
            port = strategy.cluster_environment.main_port  # what Lightning's launcher hands the workers
            assert os.environ["MASTER_PORT"] == str(port) and os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True"
            client = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=TEST_TIMEOUT)
            client.set("rank1", "here")  # a worker's client reaches the store the launcher holds
            assert client.get("rank1") == b"here"
            del client
            ports.append(port)
        assert "MASTER_PORT" not in os.environ and "TORCHELASTIC_USE_AGENT_STORE" not in os.environ
    monkeypatch.setenv("MASTER_PORT", "29999")
    strategy = pl.Trainer(accelerator="cpu", devices=2, strategy="mpipemoe_spawn", logger=False).strategy
    with hosted_rendezvous(strategy):
        assert strategy.cluster_environment.main_port == 29999 and "TORCHELASTIC_USE_AGENT_STORE" not in os.environ


def test_executor_overrides_map_onto_executor_config():
    assert executor_overrides() == {}
    link = SimulatedLink(latency_s=0.001, bandwidth_bytes_per_s=1e9)
    assert executor_overrides(granularity=4, restore="s4", simulated_link=link) == {
        "num_partitions": 4,
        "restore": "s4",
        "link": link,
    }
    assert executor_overrides(simulated_link={"latency_s": 0.001})["link"] == SimulatedLink(latency_s=0.001)
    with pytest.raises(ValueError, match="granularity must be"):
        executor_overrides(granularity=0)
    with pytest.raises(ValueError, match="restore must be"):
        executor_overrides(restore="s9")
    assert executor_overrides("auto", "auto", memory_budget=2**30) == {
        "num_partitions": "auto",
        "restore": "auto",
        "memory_budget": 2**30,
    }
    with pytest.raises(ValueError, match="memory_budget"):
        executor_overrides(memory_budget=-1.0)


def test_clear_errors_before_any_process_starts():
    with pytest.raises(ValueError, match=r"2 devices x 1 nodes: expert_parallel_size=3 does not divide the world size"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=MPipeMoEStrategy(expert_parallel_size=3), logger=False)
    with pytest.raises(ValueError, match="expert_parallel_size must be a positive int"):
        MPipeMoEStrategy(expert_parallel_size=0)
    with pytest.raises(ValueError, match="post-local-SGD"):
        MPipeMoEStrategy(model_averaging_period=4)
    with pytest.raises(ValueError, match="16-mixed"):
        pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=MPipeMoEStrategy(),
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
            logger=False,
        )

    class CustomPrecision(Precision):
        pass

    with pytest.raises(ValueError, match="does not support the CustomPrecision precision plugin"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=MPipeMoEStrategy(), plugins=[CustomPrecision()], logger=False)


def test_discovery_finds_moe_layers_and_hf_models():
    """One interface for both kinds: this project's MoELayer and a covered Hugging Face model
    (found as one unit); a dense HF model is left alone; an uncovered HF MoE family is an error."""
    from transformers import (
        AriaTextConfig,
        AriaTextForCausalLM,
        GptOssConfig,
        GptOssForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from lightning_mpipemoe.discovery import find_moe_units
    from lightning_mpipemoe.groups import MoEProcessGroups
    from lightning_mpipemoe.hf_models.api import UnsupportedModelError
    from tests.hf_tiny import tiny_model

    tiny = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1}
    heads = {"num_attention_heads": 2, "num_key_value_heads": 1}
    root = torch.nn.ModuleDict({
        "lm": TinyMoELM(layers=1),
        "hf": tiny_model("mixtral"),
        "dense": LlamaForCausalLM(LlamaConfig(**tiny, **heads)),
    })
    units = find_moe_units(root)
    assert [(u.name, u.kind.name) for u in units] == [("lm.blocks.0.moe", "mpipemoe_layer"), ("hf", "hf_model")]
    for unit in units:
        unit.kind.shard(unit.module, MoEProcessGroups.local(), {"num_partitions": 2, "restore": "s1"})
    views = {name: view for unit in units for name, view in unit.executors().items()}
    assert {name: (v.config.num_partitions, v.config.restore, v.num_experts) for name, v in views.items()} == {
        "lm.blocks.0.moe": (2, "s1", 4),
        "hf.model.layers.0.mlp.experts": (2, "s1", 8),
        "hf.model.layers.1.mlp.experts": (2, "s1", 8),
    }
    # "auto" n on one EP rank: no all-to-all for partitions to overlap, nothing to profile.
    for unit in units:
        unit.kind.shard(unit.module, MoEProcessGroups.local(), {"num_partitions": "auto", "restore": "auto"})
    views = {name: view for unit in units for name, view in unit.executors().items()}
    assert {(v.config.num_partitions, v.config.candidates) for v in views.values()} == {("auto", (1,))}
    assert sorted(units[1].expert_parameters()) == [
        f"hf.model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("down_proj", "gate_up_proj")
    ]
    gpt_oss = GptOssForCausalLM(GptOssConfig(**tiny, **heads, head_dim=8, num_local_experts=4, num_experts_per_tok=2))
    assert [u.kind.name for u in find_moe_units(torch.nn.ModuleDict({"hf": gpt_oss}))] == ["hf_model"]
    aria = AriaTextForCausalLM(AriaTextConfig(**tiny, **heads, moe_num_experts=4, moe_topk=2))
    with pytest.raises(UnsupportedModelError, match="aria_text"):
        find_moe_units(torch.nn.ModuleDict({"hf": aria}))


# ------------------------------------------------------------------------- checkpoint pieces


def _full_checkpoint(num_experts: int = 4) -> dict:
    w_E32 = torch.arange(num_experts * 6, dtype=torch.float32).reshape(num_experts, 3, 2)
    return {
        "state_dict": {"lin.weight": torch.ones(2, 2), "moe.w": w_E32},
        "optimizer_states": [
            {
                "state": {
                    "lin.weight": {"momentum_buffer": torch.full((2, 2), 7.0)},
                    "moe.w": {"exp_avg": 10 * w_E32, "step": torch.tensor(3.0)},
                },
                "param_groups": [{"lr": 0.1, "params": ["lin.weight", "moe.w"]}],
            }
        ],
        "global_step": 3,
    }


def _saved_at(ep_size: int, num_experts: int = 4) -> tuple[dict, dict[int, dict]]:
    """What a run at `ep_size` saves: meta (rank 0) and each EP rank's shard."""
    full = _full_checkpoint(num_experts)
    meta, shards = None, {}
    for rank in range(ep_size):
        start, end = rank * num_experts // ep_size, (rank + 1) * num_experts // ep_size
        local = {**full, "state_dict": dict(full["state_dict"])}
        local["optimizer_states"] = [dict(full["optimizer_states"][0])]
        local["state_dict"]["moe.w"] = full["state_dict"]["moe.w"][start:end]
        state = dict(full["optimizer_states"][0]["state"])
        state["moe.w"] = {"exp_avg": state["moe.w"]["exp_avg"][start:end], "step": state["moe.w"]["step"]}
        local["optimizer_states"][0]["state"] = state
        meta_r, shards[rank] = split_checkpoint(local, {"moe.w": num_experts}, ep_size, ep_size, {"moe": {"n": 2}})
        meta = meta if meta is not None else meta_r
    return meta, shards


@pytest.mark.parametrize("saved_ep, loaded_ep", [(2, 1), (2, 4), (4, 2), (1, 2), (2, 2)])
def test_checkpoint_reshards_weights_and_optimizer_state(saved_ep, loaded_ep):
    meta, shards = _saved_at(saved_ep)
    assert "moe.w" not in meta["state_dict"] and "moe.w" not in meta["optimizer_states"][0]["state"]
    assert meta[SECTION]["executor_state"] == {"moe": {"n": 2}}
    full = _full_checkpoint()
    w = full["state_dict"]["moe.w"]
    for rank in range(loaded_ep):
        needed = needed_shards(meta[SECTION]["expert_keys"], saved_ep, loaded_ep, rank)
        got = assemble_checkpoint(meta, {r: shards[r] for r in needed}, loaded_ep, rank)
        rows = slice(rank * 4 // loaded_ep, (rank + 1) * 4 // loaded_ep)
        assert torch.equal(got["state_dict"]["moe.w"], w[rows])
        assert torch.equal(got["state_dict"]["lin.weight"], torch.ones(2, 2))
        state = got["optimizer_states"][0]["state"]
        assert torch.equal(state["moe.w"]["exp_avg"], 10 * w[rows]) and float(state["moe.w"]["step"]) == 3.0
        assert torch.equal(state["lin.weight"]["momentum_buffer"], torch.full((2, 2), 7.0))
        assert got["optimizer_states"][0]["param_groups"] == full["optimizer_states"][0]["param_groups"]
        assert got["global_step"] == 3
    if saved_ep == 2 and loaded_ep == 4:
        assert needed_shards(meta[SECTION]["expert_keys"], 2, 4, 3) == [1]


def test_optimizer_state_round_trips_by_name():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    names = {id(p): n for n, p in model.named_parameters()}
    def param_groups():
        return [{"params": [model[0].weight]}, {"params": [model[1].weight, model[0].bias], "lr": 0.5}]

    optimizer = torch.optim.Adam(param_groups())
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    named = optimizer_state_by_name(optimizer, names)
    assert set(named["state"]) == {"0.weight", "1.weight", "0.bias"}
    assert [g["params"] for g in named["param_groups"]] == [["0.weight"], ["1.weight", "0.bias"]]
    fresh = torch.optim.Adam(param_groups())
    fresh.load_state_dict(optimizer_state_by_index(named, fresh, names))
    for p in (model[0].weight, model[1].weight, model[0].bias):
        assert torch.equal(fresh.state[p]["exp_avg_sq"], optimizer.state[p]["exp_avg_sq"])
    other = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="other parameters than this optimizer"):
        optimizer_state_by_index(named, other, names)


def test_commit_replaces_atomically_and_cleans_up(tmp_path):
    path = tmp_path / "last.ckpt"
    for version in ("v1", "v2"):
        tmp = temporary_directory(path, version)
        tmp.mkdir()
        (tmp / META_FILE).write_text(version)
        commit_directory(tmp, path, version)
        assert (path / META_FILE).read_text() == version
    stale = temporary_directory(path, "crashed")
    stale.mkdir()
    remove_stale(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    with pytest.raises(FileNotFoundError, match="expected a directory with meta.ckpt"):
        consolidate_checkpoint(tmp_path / "missing.ckpt")
    # The start of a multi-rank save: rank 0's path and token for all, stale ones gone, then the barrier.
    from lightning_mpipemoe.atomic_dir import prepare_temporary_directory

    temporary_directory(path, "crashed").mkdir()
    calls = []

    def barrier() -> None:  # rank 0 has made the directory by then
        calls.append(temporary_directory(path, "tok").is_dir())

    for zero in (True, False):
        got, tmp, token = prepare_temporary_directory("ignored", lambda obj: (str(path), "tok"), zero, barrier)
        assert (got, tmp, token) == (path, temporary_directory(path, "tok"), "tok")
    assert calls == [True, True] and sorted(p.name for p in tmp_path.iterdir()) == [".last.ckpt.tmp-tok", "last.ckpt"]


# --------------------------------------------------------------------------- distributed runs


def _ep2_strategy(**kwargs) -> MPipeMoEStrategy:
    return MPipeMoEStrategy(expert_parallel_size=2, start_method="spawn", timeout=TEST_TIMEOUT, **kwargs)


#: The EP = 2 run (and its resumption) runs the pipelined executor: n = 2 micro-partitions with
#: buffer reuse restored by re-communication and recomputation, set through the strategy.
PIPELINED = {"granularity": 2, "restore": "s4"}


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    """2 processes, EP = 2: 5 steps, checkpoints after steps 3 and 5."""
    root = tmp_path_factory.mktemp("ep2")
    saves = SaveAt({3: root / "step3.ckpt", 5: root / "step5.ckpt"})
    trainer = _trainer(2, _ep2_strategy(**PIPELINED), root, callbacks=[LossRecorder(root / "losses.jsonl"), saves])
    model = TinyMoELM(**HPARAMS)
    trainer.fit(model, loader(GLOBAL_BATCH // 2))
    return root, model


def test_ep2_matches_single_process(ep2_run, reference):
    root, main_model = ep2_run
    _assert_losses_close(read_losses(root / "losses.jsonl"), reference["losses"], range(1, STEPS + 1))
    _assert_state_close(consolidate_checkpoint(root / "step5.ckpt"), reference["states"][-1], "final")
    _assert_state_close(consolidate_checkpoint(root / "step3.ckpt"), reference["states"][2], "step 3")
    # The spawn launcher handed the main process consolidated (all-expert) weights.
    _assert_state_close(main_model.state_dict(), reference["states"][-1], "main process")
    # Each EP rank saved only its own E/ep experts.
    shard = torch.load(root / "step5.ckpt" / shard_file(1, 2), weights_only=True)
    assert shard["state_dict"]["blocks.0.moe.gate_up_proj"].shape[0] == 2
    meta = torch.load(root / "step5.ckpt" / META_FILE, weights_only=False)
    assert "blocks.0.moe.gate_up_proj" not in meta["state_dict"]
    # The strategy's executor settings reached the layers (their recorded state says so).
    assert meta[SECTION]["executor_state"]["blocks.0.moe"] == {"decisions": {str(GLOBAL_BATCH // 2 * 8): 2}}


def test_ep2_dp2_matches_single_process(tmp_path, reference):
    """4 processes: EP = 2 x DP = 2 (experts reduced over the expert-dp group, / world). The
    ranks start from different weights (`ReplicasStartApart`: ranks 2, 3 draw their own experts,
    ranks 1..3 their own dense weights): the strategy makes the replicas equal before training,
    and every rank ends with exactly the reference's weights (its expert shard and the rest)."""
    saves = SaveAt({STEPS: tmp_path / "final.ckpt"})
    callbacks = [LossRecorder(tmp_path / "losses.jsonl"), saves, DumpState(tmp_path)]
    trainer = _trainer(4, _ep2_strategy(), tmp_path, callbacks=callbacks)
    trainer.fit(ReplicasStartApart(**HPARAMS), loader(GLOBAL_BATCH // 4))
    _assert_losses_close(read_losses(tmp_path / "losses.jsonl"), reference["losses"], range(1, STEPS + 1))
    _assert_state_close(consolidate_checkpoint(tmp_path / "final.ckpt"), reference["states"][-1], "final")
    final = reference["states"][-1]
    for rank in range(4):
        params = torch.load(tmp_path / f"params-rank{rank}.pt", weights_only=True)
        ep_rank = rank % 2
        for key, value in params.items():
            expected = final[key]
            if key.endswith((".moe.gate_up_proj", ".moe.down_proj")):
                expected = expected[ep_rank * 2 : (ep_rank + 1) * 2]
            torch.testing.assert_close(value, expected, atol=TOL, rtol=0, msg=lambda m: f"rank {rank} {key}: {m}")


def test_resume_is_exact_and_a_killed_save_keeps_the_previous_checkpoint(ep2_run, reference, tmp_path):
    """Resume the EP = 2 run from step 3 and continue to 5 (ModelCheckpoint overwriting
    `latest.ckpt` every step); the job is killed in the middle of its second save."""
    root, _ = ep2_run
    checkpoint_cb = ModelCheckpoint(
        dirpath=tmp_path, filename="latest", every_n_train_steps=1, enable_version_counter=False
    )
    trainer = _trainer(
        2,
        _ep2_strategy(**PIPELINED),
        tmp_path,
        callbacks=[LossRecorder(tmp_path / "losses.jsonl"), checkpoint_cb],
        plugins=[KillDuringSave(save_number=2)],
    )
    with pytest.raises(Exception, match="SIGKILL|signal"):
        trainer.fit(TinyMoELM(**HPARAMS), loader(GLOBAL_BATCH // 2), ckpt_path=root / "step3.ckpt")
    uninterrupted = read_losses(root / "losses.jsonl")
    resumed = read_losses(tmp_path / "losses.jsonl")
    assert resumed == {step: uninterrupted[step] for step in (4, 5)}  # bit for bit
    # The kill hit the save after step 5: its temporary directory is left, `latest.ckpt` still
    # holds step 4, complete and loadable.
    assert list(tmp_path.glob(".latest.ckpt.tmp-*"))
    latest = tmp_path / "latest.ckpt"
    assert torch.load(latest / META_FILE, weights_only=False)["global_step"] == 4
    _assert_state_close(consolidate_checkpoint(latest), reference["states"][3], "latest after the kill")


from tests.dist_utils import in_process_world as _in_process_world  # noqa: E402


def test_checkpoint_saved_at_ep2_resumes_at_ep1(ep2_run, reference, tmp_path):
    """One process (EP = 1, the whole global batch) resumes the EP = 2 run's step-3 checkpoint:
    weights and momentum of both EP shards, and the executors' saved state."""
    root, _ = ep2_run
    model = TinyMoELM(**HPARAMS)
    with _in_process_world():
        strategy = MPipeMoEStrategy(expert_parallel_size=1, timeout=TEST_TIMEOUT)
        trainer = _trainer(1, strategy, tmp_path, callbacks=[LossRecorder(tmp_path / "losses.jsonl")])
        trainer.fit(model, loader(GLOBAL_BATCH), ckpt_path=root / "step3.ckpt")
    _assert_losses_close(read_losses(tmp_path / "losses.jsonl"), reference["losses"], (4, 5))
    _assert_state_close(model.state_dict(), reference["states"][-1], "final")
    saved = torch.load(root / "step3.ckpt" / META_FILE, weights_only=False)[SECTION]["executor_state"]
    for name in ("blocks.0.moe", "blocks.1.moe"):
        layer = model.get_submodule(name)
        assert layer.loaded_state == saved[name] == {"decisions": {"16": 2}}
        assert layer.decisions == {"16": 2, "32": 1}  # restored, then extended by this run (own n = 1)
