"""Code version keys and resume-checkpoint cleanup: what makes cached results trustworthy and small."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from napkit.entrypoint import run_stage
from napkit.provenance import code_version, git_commit
from napkit.stages.common import checkpoint_path, clean_checkpoints


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A small git checkout: code under src/, pipelines/, conf/, and files that are not code."""
    repo = tmp_path / "repo"
    for rel, text in {"src/pkg/a.py": "A = 1\n", "pipelines/run.py": "print()\n", "conf/config.yaml": "x: 1\n",
                      "README.md": "hi\n", ".gitignore": "*.log\n"}.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")
    return repo


def test_code_version_follows_the_code_committed_or_not(checkout: Path) -> None:
    repo = checkout
    v0 = code_version(repo)
    assert len(v0) == 16 and git_commit(repo) and len(git_commit(repo)) == 40
    (repo / "README.md").write_text("other docs\n")  # not code
    (repo / "src" / "debug.log").write_text("ignored\n")  # ignored by git
    assert code_version(repo) == v0
    a = repo / "src/pkg/a.py"
    a.write_text("A = 2\n")  # uncommitted edit
    v1 = code_version(repo)
    assert v1 != v0
    (repo / "conf/new.yaml").write_text("y: 2\n")  # untracked new config
    v2 = code_version(repo)
    assert v2 not in (v0, v1)
    (repo / "conf/new.yaml").unlink()
    assert code_version(repo) == v1
    a.write_text("A = 1\n")  # back to the commit
    assert code_version(repo) == v0
    (repo / "pipelines/run.py").unlink()  # a deletion is a change
    assert code_version(repo) != v0
    _git(repo, "checkout", "--", "pipelines/run.py")
    _git(repo, "commit", "-q", "--allow-empty", "-m", "a commit that changes no code")
    assert code_version(repo) == v0


def test_code_version_outside_git_hashes_the_files(checkout: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git"))
    v0 = code_version(copy)
    assert code_version(copy) == v0
    (copy / "README.md").write_text("other docs\n")
    assert code_version(copy) == v0
    (copy / "src/pkg/__pycache__").mkdir()
    (copy / "src/pkg/__pycache__/a.cpython-311.pyc").write_bytes(b"\0")  # byte code is not code
    assert code_version(copy) == v0
    (copy / "src/pkg/a.py").write_text("A = 2\n")
    assert code_version(copy) != v0


def test_the_running_package_has_a_code_version() -> None:
    assert code_version() == code_version(Path(__file__).resolve().parents[1])


def _checkpoints(cfg, *names: str) -> list[Path]:
    paths = [checkpoint_path(cfg, n) for n in names]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"state")
    return paths


def test_a_completed_stage_deletes_its_resume_checkpoints_a_failed_one_keeps_them(compose_cfg, tmp_path) -> None:
    # pretrain: the stage whose inputs (the embedded data) the probes find without upstream outputs
    cfg = compose_cfg(f"paths.artifacts={tmp_path}", "tracking=disabled")
    mine = _checkpoints(cfg, "pretrain")
    latency = checkpoint_path(cfg, "prune_latency").with_suffix(".json")
    latency.write_text("{}")
    others = [*_checkpoints(cfg, "prune_loop", "prune_iter1", "finetune"), latency]

    def failing(_cfg) -> dict[str, float]:
        raise RuntimeError("killed in epoch 3")

    with pytest.raises(RuntimeError):
        run_stage("pretrain", cfg, failing)
    assert all(p.is_file() for p in [*mine, *others])  # a rerun resumes from them

    run_stage("pretrain", cfg, lambda _cfg: {"val_top1": 90.0})
    assert not any(p.exists() for p in mine)
    assert all(p.is_file() for p in others)  # other stages' state is theirs to delete


def test_content_addressed_cleanup_spares_other_configs(compose_cfg, tmp_path) -> None:
    """A sweep's jobs share the checkpoint folder: a finished job deletes only its own files."""
    base = (f"paths.artifacts={tmp_path}", "paths.content_addressed=true", "tracking=disabled")
    cfg, other = compose_cfg(*base), compose_cfg(*base, "prune.step_fraction=0.3")
    mine, theirs = _checkpoints(cfg, "prune_loop", "prune_iter1"), _checkpoints(other, "prune_loop", "prune_iter1")
    assert set(mine).isdisjoint(theirs)
    assert sorted(clean_checkpoints(cfg, "prune")) == sorted(mine)
    assert all(p.is_file() for p in theirs)


def test_chex_checkpoints_are_cleaned_like_every_stage(compose_cfg, tmp_path) -> None:
    """CHEX stages live in the same flow machinery: their checkpoint is checkpoint_path(cfg, stage), keyed by
    the stage key when content addressed, and cleaning spares other stages' and other configs' files."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    plain = compose_cfg(f"paths.artifacts={tmp_path}", "tracking=disabled")
    keyed = compose_cfg(f"paths.artifacts={tmp_path}", "tracking=disabled", "paths.content_addressed=true")
    other = compose_cfg(f"paths.artifacts={tmp_path}", "tracking=disabled", "paths.content_addressed=true",
                        "chex.S=0.3")
    paths = [checkpoint_path(c, "chex_train") for c in (plain, keyed, other)]
    assert len(set(paths)) == 3
    for path in [*paths, folder / "chex_compact.pt", folder / "pretrain.pt"]:
        path.write_bytes(b"state")
    assert clean_checkpoints(keyed, "chex_train") == [paths[1]]
    assert clean_checkpoints(plain, "chex_train") == [paths[0]]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["chex_compact.pt", "pretrain.pt", paths[2].name])
