"""make_dataset.py: Minari datasets that load as is, with gymnasium's episode ends, seeded, and refusals."""

import fcntl
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import minari
import numpy as np
import pytest
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import make_dataset as md  # noqa: E402
from conftest import REPO, assert_refused  # noqa: E402

TIME_LIMIT = 20
# Runs make_dataset.py and kills it (SIGKILL) just before its k-th step (0: never); at exit it prints "steps: <count>"
# on stderr. A step: Minari writing a group of an episode, a rename, a folder deletion. Arguments: k, the script's.
KILL_AT_STEP = """
import atexit, os, runpy, shutil, signal, sys
from minari.dataset._storages import hdf5_storage
kill_at, script, steps = int(sys.argv[1]), sys.argv[2], [0]
def step(function):
    def counted(*args, **kwargs):
        steps[0] += 1
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return counted
os.replace, shutil.rmtree = step(os.replace), step(shutil.rmtree)
hdf5_storage._add_episode_to_group = step(hdf5_storage._add_episode_to_group)
atexit.register(lambda: print(f"steps: {steps[0]}", file=sys.stderr))
sys.argv = [script, *sys.argv[3:]]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script` does
runpy.run_path(script, run_name="__main__")
"""
KILLED_ID = "local/killed/hopper/random-v0"
# The new dataset: one 20-step episode. Written over an old one, its steps are those of WRITE_STEPS.
NEW_FLAGS = ("--env", "Hopper-v5", "--kind", "random", "--num-steps", "20", "--max-episode-steps", "20", "--seed", "0",
             "--dataset-id", KILLED_ID)
WRITE_STEPS = ("Minari writes the episode's arrays", "Minari writes the episode's infos",
               "the old dataset is renamed aside", "the new one is renamed into place", "the old one is deleted",
               "the writing folder is deleted")


@pytest.fixture(autouse=True, scope="module")
def keep_torch_threads():
    """main() sets torch's thread count; give the other test modules theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minari_root(tmp_path_factory):
    """A private MINARI_DATASETS_PATH for the whole module."""
    root = tmp_path_factory.mktemp("minari")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(root))
        yield root


@pytest.fixture(scope="module")
def random_dataset(minari_root):
    """A tiny random-policy Hopper dataset: 300 steps, episodes cut at 20 steps by the time limit."""
    md.main(md.Args(env="Hopper-v5", kind="random", num_steps=300, max_episode_steps=TIME_LIMIT, seed=3,
                    dataset_id="local/test/hopper/random-v0"))
    return minari.load_dataset("local/test/hopper/random-v0")


def tiny_sac_args(**overrides) -> md.Args:
    """SAC budgets small enough for a test; target -1000 is reached at the first evaluation."""
    values = dict(env="Hopper-v5", num_steps=150, max_episode_steps=30, target_return=-1000.0, total_timesteps=300,
                  learning_starts=60, batch_size=32, eval_frequency=60, eval_episodes=2, seed=1)
    values.update(overrides)
    return md.Args(**values)


def episode_seeds(dataset):
    return [m["seed"] for m in dataset.storage.get_episode_metadata(range(dataset.total_episodes))]


def assert_same_episodes(dataset, other):
    """Equal episodes: every array, and the seed each was reset with."""
    assert episode_seeds(dataset) == episode_seeds(other)
    for a, b in zip(dataset.iterate_episodes(), other.iterate_episodes(), strict=True):
        for field in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def files_of(folder: Path) -> dict:
    """Every file under a folder, as {relative path: bytes}."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def run_killed_at_step(script_env: dict, root: Path, k: int, *flags: str) -> subprocess.CompletedProcess:
    """make_dataset.py with these flags under the Minari root `root`, killed at step k (0: never) by KILL_AT_STEP."""
    return subprocess.run([sys.executable, "-c", KILL_AT_STEP, str(k), str(REPO / "make_dataset.py"), *flags],
                          capture_output=True, text=True, env={**script_env, "MINARI_DATASETS_PATH": str(root)},
                          timeout=300, check=False)


def gymnasium_flags(dataset, episode, seed):
    """Replay an episode's actions from its recorded seed; check observations and rewards match and
    return what gymnasium reported as (terminated, truncated) at each step."""
    env = dataset.recover_environment()
    obs, _ = env.reset(seed=seed)
    np.testing.assert_array_equal(obs, episode.observations[0])
    flags = []
    for t, action in enumerate(episode.actions):
        obs, reward, terminated, truncated, _ = env.step(action)
        np.testing.assert_array_equal(obs, episode.observations[t + 1])
        assert reward == pytest.approx(episode.rewards[t], abs=1e-12)
        flags.append((terminated, truncated))
    return np.array(flags)


def test_random_dataset_loads_with_size_env_spec_and_reference_scores(random_dataset):
    assert random_dataset.total_steps == 300
    assert random_dataset.env_spec.id == "Hopper-v5"
    assert random_dataset.recover_environment().spec.max_episode_steps == TIME_LIMIT
    metadata = random_dataset.storage.metadata
    assert (metadata["ref_min_score"], metadata["ref_max_score"]) == (-20.272305, 3234.3)
    assert metadata["seed"] == 3 and metadata["kind"] == "random"
    assert metadata["algorithm_name"] == "uniform random policy"
    assert minari.get_normalized_score(random_dataset, np.array([3234.3]))[0] == pytest.approx(1.0)


def test_random_episodes_end_exactly_as_gymnasium_reported(random_dataset):
    episodes = list(random_dataset.iterate_episodes())
    kinds_of_end = set()
    for episode, seed in zip(episodes, episode_seeds(random_dataset)):
        flags = gymnasium_flags(random_dataset, episode, seed)
        assert episode.observations.shape == (len(episode) + 1, 11)
        assert not (episode.terminations[:-1].any() or episode.truncations[:-1].any())
        np.testing.assert_array_equal(episode.terminations, flags[:, 0])
        if episode is episodes[-1] and not flags[-1].any():  # cut by --num-steps: Minari marks it truncated
            assert episode.truncations[-1] and len(episode) < TIME_LIMIT
            continue
        np.testing.assert_array_equal(episode.truncations, flags[:, 1])
        assert episode.truncations[-1] == (len(episode) == TIME_LIMIT)  # gymnasium may report both at the limit
        kinds_of_end.add("terminated" if episode.terminations[-1] else "truncated")
    assert kinds_of_end == {"terminated", "truncated"}  # both kinds of end were exercised


def test_same_seed_gives_identical_arrays_and_another_seed_does_not(random_dataset):
    for seed, dataset_id in ((3, "local/test/hopper/random-again-v0"), (4, "local/test/hopper/random-seed4-v0")):
        md.main(md.Args(env="Hopper-v5", kind="random", num_steps=300, max_episode_steps=TIME_LIMIT, seed=seed,
                        dataset_id=dataset_id))
    same = minari.load_dataset("local/test/hopper/random-again-v0")
    other = minari.load_dataset("local/test/hopper/random-seed4-v0")
    assert_same_episodes(random_dataset, same)
    assert not np.array_equal(random_dataset[0].actions, other[0].actions)


def test_existing_dataset_is_refused_without_overwrite_and_replaced_with_it(random_dataset, minari_root, run_script):
    data_file = minari_root / "local/test/hopper/random-v0/data/main_data.hdf5"
    before = data_file.read_bytes()
    result = run_script("make_dataset.py", "--env", "Hopper-v5", "--kind", "random", "--num-steps", "50",
                        "--dataset-id", "local/test/hopper/random-v0", env={"MINARI_DATASETS_PATH": str(minari_root)})
    assert_refused(result, "pass --overwrite to replace it")
    assert len(result.stderr.strip().splitlines()) == 1
    assert data_file.read_bytes() == before

    md.main(md.Args(env="Hopper-v5", kind="random", num_steps=40, seed=0, dataset_id="local/test/hopper/replaced-v0"))
    md.main(md.Args(env="Hopper-v5", kind="random", num_steps=60, seed=0, dataset_id="local/test/hopper/replaced-v0",
                    overwrite=True))
    assert minari.load_dataset("local/test/hopper/replaced-v0").total_steps == 60


def test_one_run_at_a_time_per_dataset_and_per_sac_run_while_others_go_side_by_side(tmp_path, monkeypatch):
    """While a run writes local/held/hopper/random-v0 and another trains the seed-1 SAC run (here: this test holds their
    locks, as running make_dataset.py processes do), a run on that id would delete the first one's writing folder as
    if a kill had left it, and one on that SAC run would train it twice: both are refused. Other ids and seeds of
    the same body go ahead (the README's medium and seed-1 expert side by side)."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    namespace, pid = tmp_path / "local" / "held" / "hopper", os.getpid()
    writing = namespace / ".random-v0.writing"
    writing.mkdir(parents=True)
    (writing / "episode").write_bytes(b"the first run's")
    with open(namespace / ".random-v0.lock", "a+") as dataset_lock, open(namespace / ".sac-seed1.pt.lock", "a+") as sac:
        for lock in (dataset_lock, sac):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.write(f"{pid}\n")
            lock.flush()
        with pytest.raises(SystemExit) as refused:
            md.main(md.Args(env="Hopper-v5", kind="random", num_steps=20, dataset_id="local/held/hopper/random-v0",
                            overwrite=True))
        assert refused.value.code == (f"error: dataset local/held/hopper/random-v0 is in use by another run (process "
                                      f"{pid}): wait for it to end or choose another --dataset-id")
        assert (writing / "episode").read_bytes() == b"the first run's"
        md.main(md.Args(env="Hopper-v5", kind="random", num_steps=20, dataset_id="local/held/hopper/other-v0"))
        md.main(tiny_sac_args(kind="medium", seed=2, dataset_id="local/held/hopper/medium-v0"))
        with pytest.raises(SystemExit) as refused:
            md.main(tiny_sac_args(kind="medium", seed=1, dataset_id="local/held/hopper/medium-v0", overwrite=True))
        assert refused.value.code == (f"error: the SAC run {namespace / 'sac-seed1.pt'} is in use by another run "
                                      f"(process {pid}): wait for it to end or pass another --seed")
        assert not (namespace / "sac-seed1.pt").exists()
    assert minari.load_dataset("local/held/hopper/other-v0").total_steps == 20
    assert minari.load_dataset("local/held/hopper/medium-v0").total_steps == 150


@pytest.fixture(scope="module")
def old_and_new(tmp_path_factory, script_env):
    """A Minari root holding an old dataset at KILLED_ID (30 steps, seed 1), and the dataset that a run with
    NEW_FLAGS --overwrite, killed at no step, replaces it with (checking that run took exactly the WRITE_STEPS)."""
    old_root, straight_root = tmp_path_factory.mktemp("old"), tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(old_root))
        md.main(md.Args(env="Hopper-v5", kind="random", num_steps=30, max_episode_steps=20, seed=1,
                        dataset_id=KILLED_ID))
    shutil.copytree(old_root, straight_root, dirs_exist_ok=True)
    straight = run_killed_at_step(script_env, straight_root, 0, *NEW_FLAGS, "--overwrite")
    assert straight.returncode == 0, straight.stderr
    assert f"steps: {len(WRITE_STEPS)}" in straight.stderr
    new = minari.MinariDataset(straight_root / KILLED_ID / "data")
    assert new.total_steps == 20 and new.total_episodes == 1 and new.id == KILLED_ID
    return old_root, new


@pytest.mark.parametrize("step", WRITE_STEPS)
def test_overwrite_killed_at_each_step_leaves_the_old_dataset_or_the_new_one(step, old_and_new, script_env, tmp_path,
                                                                             monkeypatch):
    old_root, new = old_and_new
    root = tmp_path / "minari"
    shutil.copytree(old_root, root)
    folder, old_files = root / KILLED_ID, files_of(old_root / KILLED_ID)
    others = {"random-v0.old": b"not a temporary", ".random-v1.writing": b"another id's"}  # to be left alone
    for name, content in others.items():
        (folder.parent / name).mkdir()
        (folder.parent / name / "file").write_bytes(content)
    killed = run_killed_at_step(script_env, root, WRITE_STEPS.index(step) + 1, *NEW_FLAGS, "--overwrite")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    new_in_place = WRITE_STEPS.index(step) > WRITE_STEPS.index("the new one is renamed into place")

    def assert_old_or_new():
        if new_in_place:
            assert_same_episodes(minari.MinariDataset(folder / "data"), new)
        else:
            assert files_of(folder) == old_files

    if step != "the new one is renamed into place":  # (killed between the two renames, the old one is aside)
        assert_old_or_new()  # what a training run loading it now would read
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    with pytest.raises(SystemExit, match="already exists"):  # the next run recovers, then refuses to replace it
        md.main(tyro.cli(md.Args, args=list(NEW_FLAGS)))
    assert_old_or_new()
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted([".random-v0.lock", "namespace_metadata.json",
                                                                      "random-v0", *others])  # (the runs' lock)
    assert all((folder.parent / name / "file").read_bytes() == content for name, content in others.items())
    assert list(minari.list_local_datasets()) == [KILLED_ID]


def test_partial_dataset_of_a_write_in_place_is_refused_in_one_sentence_and_replaced_with_overwrite(
        old_and_new, script_env, run_script, tmp_path, monkeypatch):
    """Older versions wrote in place: a kill inside Minari's write left what this run's writing folder holds when it
    is killed there (metadata with 0 episodes, a data file cut short). Loading it raised an OSError."""
    root, new = tmp_path / "minari", old_and_new[1]
    killed = run_killed_at_step(script_env, root, WRITE_STEPS.index("Minari writes the episode's infos") + 1,
                                *NEW_FLAGS)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    folder = root / KILLED_ID
    (folder.parent / f".{folder.name}.writing" / KILLED_ID).rename(folder)  # where the older version had written it
    partial = files_of(folder)
    assert b'"total_episodes": 0' in partial["data/metadata.json"]
    with pytest.raises(OSError):
        list(minari.MinariDataset(folder / "data").iterate_episodes())
    result = run_script("make_dataset.py", *NEW_FLAGS, env={"MINARI_DATASETS_PATH": str(root)})
    assert_refused(result, f"dataset {KILLED_ID} at {folder} is incomplete (an interrupted write): pass --overwrite "
                           f"to make it again")
    assert len(result.stderr.strip().splitlines()) == 1
    assert files_of(folder) == partial
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    md.main(tyro.cli(md.Args, args=[*NEW_FLAGS, "--overwrite"]))
    assert_same_episodes(minari.load_dataset(KILLED_ID), new)


@pytest.mark.parametrize("damage", ["no metadata", "metadata cut short", "no data file", "no data folder"])
@pytest.mark.parametrize("kind", ["random", "medium-expert"])  # medium-expert: its medium part is the damaged one
def test_incomplete_dataset_or_part_is_refused_and_left_as_it_is(damage, kind, old_and_new, tmp_path, monkeypatch):
    old_root, _ = old_and_new
    dataset_id = "local/damaged/hopper/random-v0" if kind == "random" else "local/damaged/hopper/medium-v0"
    folder = tmp_path / dataset_id
    shutil.copytree(old_root / KILLED_ID, folder)
    data = folder / "data"
    if damage == "no metadata":
        (data / "metadata.json").unlink()
    elif damage == "metadata cut short":
        (data / "metadata.json").write_bytes((data / "metadata.json").read_bytes()[:100])
    elif damage == "no data file":
        (data / "main_data.hdf5").unlink()
    else:
        shutil.rmtree(data)
    before = files_of(tmp_path)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        md.main(md.Args(env="Hopper-v5", kind=kind, num_steps=20, dataset_id=f"local/damaged/hopper/{kind}-v0"))
    assert exit_info.value.code == (f"error: dataset {dataset_id} at {folder} is incomplete (an interrupted write): "
                                    f"pass --overwrite to make it again")
    assert {name: data for name, data in files_of(tmp_path).items() if not name.endswith(".lock")} == before


@pytest.mark.parametrize("case, message", [
    ("garbage SAC run", "sac-seed1.pt is corrupted or not a checkpoint (UnpicklingError)"),
    ("full disk at the SAC save", "sac-seed1.pt (No space left on device; it needs about"),
    ("full disk at the dataset write", f"cannot write dataset {KILLED_ID} (No space left on device; it needs about"),
])
def test_a_garbage_sac_run_or_a_full_disk_is_one_sentence_and_the_old_files_stay(case, message, old_and_new, tmp_path,
                                                                                 monkeypatch):
    root = tmp_path / "minari"
    shutil.copytree(old_and_new[0], root)
    run_path = root / "local/killed/hopper/sac-seed1.pt"
    if case == "garbage SAC run":  # it was a traceback, as was a full disk
        run_path.write_bytes(b"not a SAC run")
    elif case == "full disk at the SAC save":
        run_path.with_name("sac-seed1.pt.tmp").symlink_to("/dev/full")  # a real ENOSPC
    else:  # h5py crashes (segfault) when the disk fills as it writes: the free space is checked first
        monkeypatch.setattr(md.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    def kept():  # (the locks hold the pid of the last run)
        return {name: data for name, data in files_of(root).items() if not name.endswith(".lock")}

    before = kept()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    with pytest.raises(SystemExit) as refused:
        md.main(tyro.cli(md.Args, args=[*NEW_FLAGS, "--overwrite"]) if case.endswith("dataset write") else
                tiny_sac_args(kind="medium", dataset_id="local/killed/hopper/medium-v0"))
    assert message in refused.value.code and refused.value.code.startswith("error: ")
    assert kept() == before


def test_ctrl_c_is_one_sentence_and_exit_130(script_env, tmp_path):
    flags = ["--kind", "medium", "--learning-starts", "1000000", "--eval-frequency", "1000000"]
    process = subprocess.Popen([sys.executable, str(REPO / "make_dataset.py"), *flags], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**script_env, "MINARI_DATASETS_PATH": str(tmp_path)})
    assert process.stdout.readline().startswith("[SAC] 1,000/1,000,000 steps")  # SAC is training
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted (Ctrl-C); what was saved is whole, and the same " \
                                              "command continues"
    assert [path.name for path in tmp_path.rglob("*") if path.is_file() and path.suffix != ".lock"] == []


def test_unknown_env_exits_non_zero_with_one_sentence_and_no_traceback(tmp_path, run_script):
    result = run_script("make_dataset.py", "--env", "NoSuchBody-v5", env={"MINARI_DATASETS_PATH": str(tmp_path)})
    assert_refused(result, "unknown or unavailable environment id 'NoSuchBody-v5'")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--env", "CartPole-v1"], "CartPole-v1 is not a MuJoCo environment"),
    (["--env", "Pendulum-v1"], "Pendulum-v1 is not a MuJoCo environment"),
    (["--kind", "expertish"], "invalid choice 'expertish'"),
    (["--dataset-id", "no version"], "--dataset-id 'no version' has no version: end it with -v<N>"),
    (["--dataset-id", "local/hopper/medium", "--kind", "random"], "has no version: end it with -v<N>"),  # a traceback
    (["--dataset-id", "mujoco/hopper/medium-v0", "--kind", "random"], "datasets made here live under local/"),
    (["--env", "Ant-v5", "--kind", "medium"], "D4RL has no medium level for Ant-v5; pass --target-return"),
])
def test_bad_input_is_a_system_exit_with_a_message(flags, message, minari_root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        md.main(tyro.cli(md.Args, args=[*flags, "--num-steps", "10"]))
    assert exit_info.value.code != 0
    assert message in " ".join(f"{exit_info.value.code} {capsys.readouterr().err}".split())


@pytest.mark.parametrize("flags, message", [
    (["--num-steps", "0"], "--num-steps must be >= 1, not 0"),  # once wrote an empty dataset that CQL failed on
    (["--num-steps", "-5"], "--num-steps must be >= 1, not -5"),
    (["--total-timesteps", "0"], "--total-timesteps must be >= 1, not 0"),
    (["--eval-frequency", "0"], "--eval-frequency must be >= 1, not 0"),
    (["--eval-episodes", "0"], "--eval-episodes must be >= 1, not 0"),
    (["--num-threads", "0"], "--num-threads must be >= 1, not 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, not 0"),
    (["--policy-frequency", "0"], "--policy-frequency must be >= 1, not 0"),
    (["--target-network-frequency", "0"], "--target-network-frequency must be >= 1, not 0"),
    (["--max-episode-steps", "0"], "--max-episode-steps must be >= 1, not 0"),
    (["--learning-starts", "-1"], "--learning-starts must be >= 0, not -1"),
    (["--seed", "-1"], "--seed must be in [0, 2^32), not -1"),
    (["--seed", str(2**64)], f"--seed must be in [0, 2^32), not {2**64}"),  # torch.manual_seed's traceback
    (["--gamma", "1.5"], "--gamma must be in [0, 1), not 1.5"),
    (["--gamma", "1"], "--gamma must be in [0, 1), not 1.0"),
    (["--tau", "0"], "--tau must be in (0, 1], not 0.0"),
    (["--q-lr", "-1"], "--q-lr must be > 0, not -1.0"),
    (["--policy-lr", "inf"], "--policy-lr must be > 0, not inf"),
    (["--alpha", "-0.1", "--no-autotune"], "--alpha must be >= 0, not -0.1"),
    (["--target-return", "nan"], "--target-return must be a finite number, not nan"),
])
def test_out_of_range_flag_is_refused_in_one_sentence_before_anything_is_written(flags, message, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:  # a tiny random dataset if the refusal were missing
        md.main(tyro.cli(md.Args, args=["--kind", "random", "--num-steps", "10", *flags]))
    assert exit_info.value.code == f"error: {message}"  # a string code: printed to stderr, exit status 1
    assert not any(tmp_path.iterdir())


def test_num_steps_zero_exits_1_with_one_line_on_stderr_and_writes_nothing(tmp_path, run_script):
    result = run_script("make_dataset.py", "--kind", "random", "--num-steps", "0",
                        env={"MINARI_DATASETS_PATH": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --num-steps must be >= 1, not 0"
    assert not any(tmp_path.iterdir())


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tyro.cli(md.Args, args=["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    for name in md.Args.__dataclass_fields__:
        flag = "--" + name.replace("_", "-")
        assert f"{flag} " in text or f"{flag}, " in text, f"{flag} missing from --help"
        help_text = re.split(f"{flag}[ ,]", text, maxsplit=1)[1].split("(default:")[0]
        assert len(help_text.split()) >= 4, f"{flag} has no help text"


def test_soft_q_target_matches_hand_computation():
    rewards, terminations = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [1.0]])
    next_q1, next_q2 = torch.tensor([[5.0], [7.0]]), torch.tensor([[4.0], [9.0]])
    next_log_prob = torch.tensor([[-1.0], [3.0]])
    target = md.soft_q_target(rewards, terminations, next_q1, next_q2, next_log_prob, alpha=0.5, gamma=0.9)
    # row 0: 1 + 0.9 * (min(5, 4) - 0.5 * -1) = 5.05; row 1 is terminal: 2
    torch.testing.assert_close(target, torch.tensor([[5.05], [2.0]]))


def test_tanh_gaussian_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    actor = md.Actor(5, np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32))
    obs = torch.randn(16, 5)
    action, log_prob, _ = actor.sample(obs, torch.Generator().manual_seed(3))
    mean, log_std = actor(obs)
    x = mean + log_std.exp() * torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(action, torch.tanh(x) * actor.action_scale + actor.action_bias)
    expected = (torch.distributions.Normal(mean, log_std.exp()).log_prob(x)
                - torch.log(actor.action_scale * (1 - torch.tanh(x).pow(2)) + 1e-6)).sum(1, keepdim=True)
    torch.testing.assert_close(log_prob, expected)
    torch.testing.assert_close(actor.act(obs, torch.Generator().manual_seed(3)), action)  # the rollout path


def test_soft_update_is_polyak_averaging():
    net, target_net = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.1 * p.detach() + 0.9 * t.detach() for p, t in zip(net.parameters(), target_net.parameters())]
    md.soft_update(target_net, net, tau=0.1)
    for target_param, value in zip(target_net.parameters(), expected):
        torch.testing.assert_close(target_param.detach(), value)


def test_critic_update_reduces_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    obs_dim, act_dim = 5, 2
    actor = md.Actor(obs_dim, -np.ones(act_dim, np.float32), np.ones(act_dim, np.float32))
    qf1, qf2, qf1_target, qf2_target = (md.SoftQNetwork(obs_dim, act_dim) for _ in range(4))
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=3e-4)
    batch = {"observations": torch.randn(64, obs_dim), "next_observations": torch.randn(64, obs_dim),
             "actions": torch.rand(64, act_dim) * 2 - 1, "rewards": torch.randn(64, 1),
             "terminations": (torch.rand(64, 1) < 0.1).float()}
    # the first loss by hand: both critics against y from the target critics at a' ~ pi(.|s'), the same draw
    torch.manual_seed(5)
    with torch.no_grad():
        next_action, next_log_prob, _ = actor.sample(batch["next_observations"])
        nxt = batch["next_observations"]
        y = batch["rewards"] + 0.99 * (1 - batch["terminations"]) * (
            torch.min(qf1_target(nxt, next_action), qf2_target(nxt, next_action)) - 0.2 * next_log_prob)
        expected = sum(((q(batch["observations"], batch["actions"]) - y) ** 2).mean() for q in (qf1, qf2)).item()
    torch.manual_seed(5)
    losses = [md.update_critics(batch, actor, qf1, qf2, qf1_target, qf2_target, q_optimizer, 0.2, 0.99)
              for _ in range(100)]
    assert losses[0] == pytest.approx(expected, rel=1e-6)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("target_entropy, step", [(-100.0, -0.1), (100.0, 0.1)])
def test_temperature_moves_log_alpha_towards_the_target_entropy(target_entropy, step):
    # alpha's loss -alpha (log pi + target entropy): far above the target entropy (-100) alpha falls, far below it
    # (+100) it rises; Adam's first step moves log alpha by exactly its learning rate
    torch.manual_seed(0)
    actor = md.Actor(5, -np.ones(2, np.float32), np.ones(2, np.float32))
    qf1, qf2 = md.SoftQNetwork(5, 2), md.SoftQNetwork(5, 2)
    log_alpha = torch.zeros(1, requires_grad=True)
    alpha = md.update_actor_and_alpha(torch.randn(16, 5), actor, qf1, qf2, torch.optim.Adam(actor.parameters()),
                                      log_alpha, torch.optim.Adam([log_alpha], lr=0.1), target_entropy, 1.0)
    assert log_alpha.item() == pytest.approx(step, abs=1e-6) and alpha == pytest.approx(math.exp(step), rel=1e-6)


def test_actor_update_raises_q_of_its_actions():
    torch.manual_seed(0)
    obs_dim, act_dim = 5, 2
    actor = md.Actor(obs_dim, -np.ones(act_dim, np.float32), np.ones(act_dim, np.float32))
    qf1, qf2 = md.SoftQNetwork(obs_dim, act_dim), md.SoftQNetwork(obs_dim, act_dim)
    obs = torch.randn(64, obs_dim)
    log_alpha = torch.zeros(1, requires_grad=True)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=1e-3)

    def q_of_actor():
        with torch.no_grad():
            action = actor.sample(obs, torch.Generator().manual_seed(0))[0]
            return torch.min(qf1(obs, action), qf2(obs, action)).mean().item()
    before = q_of_actor()
    critics_before = [p.clone() for p in [*qf1.parameters(), *qf2.parameters()]]
    for _ in range(50):
        md.update_actor_and_alpha(obs, actor, qf1, qf2, actor_optimizer, log_alpha, None, -float(act_dim), 0.0)
    assert q_of_actor() > before
    for param, value in zip([*qf1.parameters(), *qf2.parameters()], critics_before):
        assert param.grad is None and param.requires_grad  # no critic gradient, and trainable again afterwards
        assert torch.equal(param, value)


def test_sac_kinds_medium_replay_and_medium_expert(minari_root):
    md.main(tiny_sac_args(kind="medium", dataset_id="local/chain/hopper/medium-v0"))
    medium = minari.load_dataset("local/chain/hopper/medium-v0")
    assert medium.total_steps == 150 and medium.storage.metadata["kind"] == "medium"
    assert medium.storage.metadata["behaviour_eval_return"] >= -1000.0
    run_path = minari_root / "local/chain/hopper/sac-seed1.pt"
    assert run_path.exists()  # the behaviour run is saved beside the datasets

    # Same seed, fresh directory: the whole SAC path (init, training, roll-out) is reproducible.
    md.main(tiny_sac_args(kind="medium", dataset_id="local/again/hopper/medium-v0"))
    again = minari.load_dataset("local/again/hopper/medium-v0")
    for a, b in zip(medium.iterate_episodes(), again.iterate_episodes(), strict=True):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)

    older = torch.load(run_path, weights_only=True)  # as make_dataset.py saved it before it had a digest: still read
    torch.save({key: value for key, value in older.items() if key not in ("meta", "sha256")}, run_path)
    md.main(tiny_sac_args(kind="medium-replay", dataset_id="local/chain/hopper/medium-replay-v0"))
    replay = minari.load_dataset("local/chain/hopper/medium-replay-v0")
    assert replay.total_steps == medium.storage.metadata["behaviour_step"]  # every step until medium, no more
    for episode, seed in zip(replay.iterate_episodes(), episode_seeds(replay)):
        flags = gymnasium_flags(replay, episode, seed)
        np.testing.assert_array_equal(episode.terminations, flags[:, 0])
        np.testing.assert_array_equal(episode.truncations, flags[:, 1])
        assert flags[-1].any()  # training replay holds whole episodes

    medium_file = minari_root / "local/chain/hopper/medium-v0/data/main_data.hdf5"
    medium_bytes = medium_file.read_bytes()
    md.main(tiny_sac_args(kind="medium-expert", dataset_id="local/chain/hopper/medium-expert-v0"))
    assert medium_file.read_bytes() == medium_bytes  # medium reused, not regenerated
    expert = minari.load_dataset("local/chain/hopper/expert-v0")
    assert expert.storage.metadata["sac_total_timesteps"] >= 300  # expert continued the same run to its budget
    combined = minari.load_dataset("local/chain/hopper/medium-expert-v0")
    assert combined.total_steps == 300
    parts = list(medium.iterate_episodes()) + list(expert.iterate_episodes())
    for a, b in zip(parts, combined.iterate_episodes(), strict=True):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.truncations, b.truncations)


def test_an_exported_behaviour_policy_makes_the_same_dataset_again_without_sac(minari_root, tmp_path):
    made = tiny_sac_args(kind="medium", dataset_id="local/policy/hopper/medium-v0")
    md.main(made)
    policy = tmp_path / "medium-policy.pt"
    md.main(tiny_sac_args(kind="medium", dataset_id="local/policy/hopper/medium-v0", export_policy=str(policy)))
    assert policy.stat().st_size < 400_000  # weights only: ~70k float32 parameters of a 2x256 actor
    run_file = minari_root / "local/policy/hopper/sac-seed1.pt"
    run_file.rename(tmp_path / "sac-run.pt")  # no SAC run to read: the policy file alone makes the data
    md.main(tiny_sac_args(kind="medium", dataset_id="local/policy/hopper/again-v0", behaviour_policy=str(policy)))
    assert not run_file.exists()
    first, again = (minari.load_dataset(f"local/policy/hopper/{name}-v0") for name in ("medium", "again"))
    assert_same_episodes(first, again)
    for key in ("behaviour_step", "behaviour_eval_return", "target_return", "sac_total_timesteps"):
        assert again.storage.metadata[key] == first.storage.metadata[key], key

    assert again.storage.metadata["behaviour_policy"] == str(policy.resolve())

    before = files_of(minari_root)
    for flags, message in (
            (dict(kind="expert"), "is the medium policy of Hopper-v5 with time limit 30, not the expert policy"),
            (dict(kind="expert", max_episode_steps=40), "with time limit 30, not the expert policy of Hopper-v5 with "
                                                        "time limit 40"),
            (dict(env="Walker2d-v5"), "is the medium policy of Hopper-v5"),
            (dict(kind="random"), "--behaviour-policy goes with --kind medium or expert"),
            (dict(behaviour_policy=str(tmp_path / "none.pt")), f"--behaviour-policy {tmp_path / 'none.pt'} does not "
                                                               f"exist"),
            (dict(behaviour_policy=None, export_policy=str(policy)), f"--export-policy {policy} already exists: pass "
                                                                     f"--overwrite"),
            (dict(behaviour_policy=None, export_policy=str(tmp_path / "no" / "x.pt")), "the folder"),
            (dict(export_policy=str(tmp_path / "x.pt")), "--export-policy and --behaviour-policy exclude each other")):
        with pytest.raises(SystemExit) as refused:
            md.main(tiny_sac_args(**{"dataset_id": "local/policy/hopper/refused-v0", "behaviour_policy": str(policy),
                                     **flags}))
        assert message in str(refused.value.code), flags
    assert files_of(minari_root) == before and sorted(path.name for path in tmp_path.iterdir()) == [
        "medium-policy.pt", "sac-run.pt"]  # no lock, folder or file left by a refused command


def test_medium_target_not_reached_within_budget_is_a_clear_error(minari_root, capsys):
    with pytest.raises(SystemExit, match="raise --total-timesteps"):
        md.main(tiny_sac_args(kind="medium", target_return=1e9, total_timesteps=100,
                              dataset_id="local/unreached/hopper/medium-v0"))
    assert not (minari_root / "local/unreached/hopper/medium-v0").exists()
    eval_lines = [line for line in capsys.readouterr().out.splitlines() if "eval return" in line]
    assert len(eval_lines) >= 2 and "/100 steps (" in eval_lines[0] and "ETA" in eval_lines[0]
    assert "(or sooner: stops at an eval return >= 1e+09)" in eval_lines[0]  # medium stops at its target
    assert "/100 steps (" in eval_lines[-1] or "(past --total-timesteps 100 to end the episode)" in eval_lines[-1]


def test_progress_lines_say_done_of_total_elapsed_speed_and_eta(minari_root, monkeypatch, capsys):
    monkeypatch.setattr(md, "LOG_EVERY_STEPS", 25)  # step lines, not only eval lines, within the tiny budget
    md.main(tiny_sac_args(kind="expert", dataset_id="local/progress/hopper/expert-v0"))
    out = capsys.readouterr().out.splitlines()
    sac = [line for line in out if line.startswith("[SAC]") and "trained" not in line]
    rollout = [line for line in out if line.startswith("[expert] collected")]
    assert any("eval return" in line for line in sac) and any("eval return" not in line for line in sac)
    assert len(rollout) == 10  # every 10% of --num-steps 150
    for line, total in [*((line, 300) for line in sac), *((line, 150) for line in rollout)]:
        assert " elapsed, " in line and " steps/s, ETA " in line, line
        done, shown_total = map(int, re.search(r"(\d+)/(\d+) steps \(", line).groups())
        # the last episode of the budget may end past it, and then says so
        assert shown_total == total or (done == shown_total > total and "past --total-timesteps 300" in line), line
    assert rollout[-1].startswith("[expert] collected 150/150 steps (100%)") and ", ETA 0s |" in rollout[-1]
