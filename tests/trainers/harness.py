"""`make test-trainers`: each trainer installed from PyPI in a throwaway virtual environment, run on a quickstart plan.

Not part of `make test` or CI: the installs are GBs and minutes each. Everything lives under `.trainers/`
(git-ignored; MIXOPT_TRAINERS_DIR moves it): one venv per trainer, with torch pinned to the CPU build
(installed first, then the trainer under a constraint so pip cannot replace it), a tiny random Llama with
the embedded SmolLM2 tokenizer, and the plan `mixopt plan recipes/quickstart.yaml --budget 2000` writes
(MIXOPT_TRAINERS_PLAN=<run folder> reuses one). A venv is reused while its stamp names the same packages.
MEGATRON_LM=<a Megatron-LM checkout> also runs the README's preprocess_data.py route (not on PyPI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mixopt.exports import TESTED_TRAINERS

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
TORCH = "torch==2.13.0"  # the CPU build on disk; an unpinned torch pulls GBs of CUDA
# what each venv installs after torch: the trainer at its tested version, and what the measuring script needs
PACKAGES = {
    "trl": [f"trl=={TESTED_TRAINERS['trl']}"],
    "llamafactory": [f"llamafactory=={TESTED_TRAINERS['llamafactory']}"],
    "axolotl": [f"axolotl=={TESTED_TRAINERS['axolotl']}"],
    "megatron": [f"megatron-core=={TESTED_TRAINERS['megatron-core']}", "transformers", "pyarrow"],
}
if os.environ.get("MEGATRON_LM"):  # a Megatron-LM checkout: its tools/preprocess_data.py imports these too
    PACKAGES["megatron"] += ["six", "triton"]


def trainers_dir() -> Path:
    path = Path(os.environ.get("MIXOPT_TRAINERS_DIR", ROOT / ".trainers"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pip(venv: Path, args: list[str], log: Path) -> None:
    with log.open("a") as f:
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", *args], check=True, stdout=f, stderr=f)


def _fit_to_cpu_torch(venv: Path, log: Path) -> None:
    """PyPI's torchvision and torchaudio (LLaMA-Factory requires both) are built against another torch, and
    their compiled ops fail to load on the CPU torch 2.13: transformers imports torchvision when it is there
    (so: uninstall it), LLaMA-Factory imports torchaudio at module level (so: keep its Python, drop its
    compiled extension, which torchaudio's loader treats as absent). Text fine-tuning uses neither."""
    with log.open("a") as f:
        subprocess.run([str(venv / "bin/python"), "-m", "pip", "uninstall", "-y", "torchvision"], check=True, stdout=f)
    for library in venv.glob("lib/python3*/site-packages/torchaudio/lib/*.so"):
        library.unlink()


def trainer_venv(name: str) -> Path:
    """`.trainers/<name>`: a venv with torch (CPU) and the trainer, installed once per package list."""
    venv = trainers_dir() / name
    stamp = venv / "mixopt-installed.json"
    wanted = [TORCH, *PACKAGES[name]]
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return venv
    log = trainers_dir() / f"{name}-install.log"
    constraint = trainers_dir() / "torch-cpu.txt"
    constraint.write_text(TORCH + "\n")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    print(f"installing {' '.join(wanted)} into {venv} (log: {log})", file=sys.stderr)
    _pip(venv, [TORCH], log)
    _pip(venv, ["-c", str(constraint), *PACKAGES[name]], log)
    _fit_to_cpu_torch(venv, log)
    stamp.write_text(json.dumps(wanted))
    return venv


def run_measure(name: str, run: Path, model: Path, tmp_path: Path, timeout: int = 1800) -> dict:
    """Run `measure_<name>.py` in the trainer's venv from `run`; returns what it measured."""
    venv = trainer_venv(name)
    result = tmp_path / f"{name}.json"
    env = os.environ | {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the trainer's venv only: mixopt is not installed there
    done = subprocess.run(
        [str(venv / "bin" / "python"), str(HERE / f"measure_{name}.py"), str(model), str(result)],
        cwd=run,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    (tmp_path / f"{name}.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"{name} failed:\n{(done.stdout + done.stderr)[-6000:]}"
    return json.loads(result.read_text())
