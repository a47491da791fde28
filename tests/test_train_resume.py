"""Resumable training: training states (atlasflow.training.state), stopping on SIGINT/SIGTERM
(training.interrupt, training.run) and ``atlasflow train --resume``.

The key property: a run stopped and resumed (here twice, once in each phase) ends with the
weights, optimiser moments and random states of a run that never stopped, bit for bit (CPU, one
thread, deterministic kernels).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from factories import REPO, tiny_net_config, write_label_maps
from safetensors.torch import load_file

from atlasflow.cli.main import main as cli_main
from atlasflow.errors import AtlasflowError
from atlasflow.nn import RegistrationModel
from atlasflow.training import train as train_module
from atlasflow.training.interrupt import StopOnSignal, TrainingStopped
from atlasflow.training.state import (
    load_state,
    read_state_meta,
    restore_optimiser,
    save_state,
    state_path,
    to_device,
)
from atlasflow.training.train import TrainSettings, train

TINY = tiny_net_config()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Three tiny label maps (two train, one held out) and their cache, shared by the tests."""
    folder = tmp_path_factory.mktemp("resume")
    return {"maps": write_label_maps(folder / "maps", n=3), "cache": folder / "cache"}


def tiny(data: dict, **changes) -> TrainSettings:
    """3 affine + 5 flow steps on a 32^3 grid, held-out validation and a checkpoint every 2."""
    base = dict(
        label_dir=data["maps"],
        cache_dir=data["cache"],
        train_shape=(32, 32, 32),
        affine_steps=3,
        flow_steps=5,
        holdout_maps=1,
        validation_pairs=1,
        checkpoint_every=2,
        log_every=1,
        threads=1,
    )
    return TrainSettings(**{**base, **changes})


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """The weights of a run that was never stopped."""
    out = tmp_path_factory.mktemp("straight") / "model.safetensors"
    train(out, tiny(data), config=TINY)
    return out


def signal_at(monkeypatch, prefix: str, signum: int = signal.SIGTERM) -> None:
    """Send this process a real ``signum`` while the progress line ``prefix...`` is logged."""
    log_line = train_module.log_line

    def log_and_kill(line, stream=None):
        log_line(line, stream)
        if line.startswith(prefix):
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(train_module, "log_line", log_and_kill)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different[:5]}"


def moments(state) -> dict:
    return {
        f"{phase}.{index}.{key}": value
        for phase, saved in state.optimisers.items()
        for index, entries in saved["state"].items()
        for key, value in entries.items()
    }


def test_a_run_stopped_twice_and_resumed_ends_bitwise_as_one_that_never_stopped(
    data, straight, tmp_path, monkeypatch
):
    out = tmp_path / "model.safetensors"
    signal_at(monkeypatch, "affine step 2/")
    with pytest.raises(TrainingStopped) as stopped:
        train(out, tiny(data), config=TINY)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert stopped.value.where == "affine step 2" and stopped.value.state == state_path(out)
    assert read_state_meta(state_path(out))["progress"] == {
        "affine_done": 2,
        "affine_finished": False,
        "flow_done": 0,
    }
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again

    signal_at(monkeypatch, "flow step 3/", signal.SIGINT)  # Ctrl-C
    # what SIGINT did before (Python's handler; ignored under a shell's background `&`)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingStopped, match="after flow step 3") as stopped:
        train(out, tiny(data), config=TINY, resume=state_path(out))
    assert stopped.value.exit_code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before
    monkeypatch.undo()
    train(out, tiny(data), config=TINY, resume=state_path(out))

    assert_same_tensors(load_file(out), load_file(straight))
    resumed, uninterrupted = load_state(state_path(out)), load_state(state_path(straight))
    assert_same_tensors(moments(resumed), moments(uninterrupted))
    for key in ("torch", "pairs"):
        assert torch.equal(resumed.rng[key], uninterrupted.rng[key])
    assert resumed.rng["numpy"] == uninterrupted.rng["numpy"]
    assert resumed.validation == uninterrupted.validation
    assert list(resumed.validation) == ["start", "affine_2", "flow_2", "flow_4", "end"]
    # What trained where: one segment per process, in the sidecar too.
    hyper = json.loads(out.with_suffix(".json").read_text())["hyper"]
    segments = [(s["affine_steps"], s["flow_steps"], s["ended"]) for s in hyper["segments"]]
    assert segments == [
        ([0, 2], [0, 0], "stopped by SIGTERM"),
        ([2, 3], [0, 3], "stopped by SIGINT"),
        ([3, 3], [3, 5], "finished"),
    ]
    assert {s["device"] for s in hyper["segments"]} == {"cpu"} == set(hyper["seconds_by_device"])
    assert hyper["completed_affine_steps"] == 3 and hyper["completed_flow_steps"] == 5
    assert hyper["seconds"] == pytest.approx(sum(s["seconds"] for s in hyper["segments"]), abs=0.2)


def test_a_second_signal_stops_at_once():
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # the first one is only noted
        with pytest.raises(SystemExit) as exited:
            os.kill(os.getpid(), signal.SIGTERM)
        assert exited.value.code == 128 + signal.SIGTERM
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_more_steps_continue_a_finished_run(data, straight, tmp_path):
    out = tmp_path / "model.safetensors"
    train(out, tiny(data, flow_steps=3), config=TINY)
    assert read_state_meta(state_path(out))["progress"]["flow_done"] == 3
    train(out, tiny(data, flow_steps=5), config=TINY, resume=state_path(out))
    assert_same_tensors(load_file(out), load_file(straight))


def test_resuming_with_other_settings_is_refused_naming_the_setting(data, straight, tmp_path):
    state = state_path(straight)
    refused = {
        "--lr is 0.01 here but 0.001": tiny(data, lr=1e-2),
        "--seed": tiny(data, seed=1),
        "train_shape": tiny(data, train_shape=(32, 32, 48)),
        "--flow-steps 4 is below the 5 flow steps": tiny(data, flow_steps=4),
        "affine phase already finished": tiny(data, affine_steps=4),
        "label maps": tiny(data, label_dir=write_label_maps(tmp_path / "other", n=1)),
    }
    for message, settings in refused.items():
        with pytest.raises(AtlasflowError, match=message):
            train(tmp_path / "m.safetensors", settings, config=TINY, resume=state)
    with pytest.raises(AtlasflowError, match="another network architecture"):
        train(
            tmp_path / "m.safetensors", tiny(data), config=RegistrationModel().config, resume=state
        )
    assert not (tmp_path / "m.safetensors").exists()


def test_states_move_between_devices_and_bad_files_are_refused(straight, tmp_path):
    state = load_state(state_path(straight), "cpu")
    # cpu -> cpu: the optimiser moments land on their parameters, with their (channels-last)
    # layout, equal to what was saved.
    model = RegistrationModel(TINY)
    model.load_state_dict(state.model)
    opt = torch.optim.Adam(model.flow.parameters())
    restore_optimiser(opt, state.optimisers["flow"])
    for index, param in enumerate(model.flow.parameters()):
        moment = opt.state[param]["exp_avg"]
        assert moment.device == param.device and moment.stride() == param.stride()
        assert torch.equal(moment, state.optimisers["flow"]["state"][index]["exp_avg"])
    # Another device through the same functions ("meta" stands in for cuda here): weights and
    # moments move, random states stay CPU bytes as torch.set_rng_state wants them.
    tensors = {
        "model.w": torch.ones(2),
        "optim.flow.0.exp_avg": torch.ones(2),
        "rng.torch": torch.get_rng_state(),
    }
    moved = to_device(tensors, "meta")
    assert moved["model.w"].is_meta and moved["optim.flow.0.exp_avg"].is_meta
    assert moved["rng.torch"].device.type == "cpu" and moved["rng.torch"].dtype == torch.uint8
    on_meta = load_state(state_path(straight), "meta")
    assert all(t.is_meta for t in on_meta.model.values())
    assert on_meta.rng["pairs"].device.type == "cpu"
    assert on_meta.optimisers["flow"]["state"][0]["step"].device.type == "cpu"
    meta_model = RegistrationModel(TINY).to("meta")
    meta_opt = torch.optim.Adam(meta_model.flow.parameters())
    restore_optimiser(meta_opt, on_meta.optimisers["flow"])
    assert all(s["exp_avg"].is_meta for s in meta_opt.state.values())

    with pytest.raises(AtlasflowError, match="no training state"):
        load_state(tmp_path / "missing.safetensors")
    with pytest.raises(AtlasflowError, match="not an atlasflow training state"):
        load_state(straight)  # the weights, not the state
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(state_path(straight).read_bytes()[:-1000])
    with pytest.raises(AtlasflowError, match="not a readable training state"):
        load_state(truncated)


def test_a_crash_while_writing_leaves_the_previous_state(straight, tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "m.train-state.safetensors"
    state = load_state(state_path(straight))
    save_state(path, state)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_state(path, state)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_train_command_killed_in_the_background_resumes(tmp_path):
    """``atlasflow train ... &``, ``kill`` after its first checkpoint, then ``--resume``: the
    weights equal those of a run that was never stopped (another process, same machine)."""
    maps = write_label_maps(tmp_path / "maps", n=1)  # one map: nothing to align, built in a second
    flags = [
        "--label-dir",
        str(maps),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--affine-steps",
        "0",
    ]
    flags += ["--crop", "32", "32", "32", "--holdout-maps", "0", "--checkpoint-every", "2"]
    flags += ["--log-every", "1", "--threads", "1"]
    out = tmp_path / "bg.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    with open(tmp_path / "bg.log", "w") as log:
        job = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "atlasflow",
                "train",
                "--out",
                str(out),
                "--flow-steps",
                "1000",
                *flags,
            ],
            env=env,
            stdout=log,
            stderr=log,
        )
    deadline = time.monotonic() + 120
    while not state_path(out).exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "bg.log").read_text()
    log = (tmp_path / "bg.log").read_text()
    assert f"continue with: atlasflow train --out {out} --resume" in log
    meta = read_state_meta(state_path(out))
    done = meta["progress"]["flow_done"]
    assert 2 <= done < 1000 and meta["segments"][-1]["ended"] == "stopped by SIGTERM"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    # The flags are the state's; only the number of steps changes.
    assert cli_main(["train", "--out", str(out), "--resume", "--flow-steps", str(done + 2)]) == 0
    whole = tmp_path / "whole.safetensors"
    assert cli_main(["train", "--out", str(whole), "--flow-steps", str(done + 2), *flags]) == 0
    assert_same_tensors(load_file(out), load_file(whole))
    hyper = json.loads(out.with_suffix(".json").read_text())["hyper"]
    assert [s["flow_steps"] for s in hyper["segments"]] == [[0, done], [done, done + 2]]


def test_train_command_refuses_a_changed_setting_in_one_line(straight, capsys):
    code = cli_main(["train", "--out", str(straight), "--resume", "--lr", "0.01"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "atlasflow train: error:" in err and "--lr is 0.01 here but 0.001" in err
    assert (
        cli_main(["train", "--out", str(straight.with_name("none.safetensors")), "--resume"]) == 1
    )
    assert "no training state" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only torch")
def test_cuda_that_is_not_there_is_an_error(tmp_path, capsys):
    assert cli_main(["train", "--out", str(tmp_path / "m.safetensors"), "--device", "cuda"]) == 1
    assert "--device cuda: no CUDA device" in capsys.readouterr().err


def test_a_spent_time_budget_ends_the_phases_and_a_larger_one_continues(data, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    train(out, tiny(data, time_budget=1e-9), config=TINY)
    assert "flow phase stopped by time budget at step 0" in capsys.readouterr().out
    meta = read_state_meta(state_path(out))
    assert meta["progress"] == {"affine_done": 0, "affine_finished": True, "flow_done": 0}
    assert meta["segments"][-1]["ended"] == "time budget"
    # The budget counts the seconds before the resume too; without one the flow phase runs.
    train(out, tiny(data, time_budget=None), config=TINY, resume=state_path(out))
    hyper = json.loads(out.with_suffix(".json").read_text())["hyper"]
    assert hyper["completed_affine_steps"] == 0 and hyper["completed_flow_steps"] == 5
    assert [s["ended"] for s in hyper["segments"]] == ["time budget", "finished"]
