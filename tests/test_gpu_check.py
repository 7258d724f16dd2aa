"""experiments/gpu_check.sh is ready for its one H200 call: valid bash, real modules, accepted flags, wheels.

No GPU here: these check what can go wrong before the call (a typo in a flag or module costs a device run).
"""
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from experiments import gpu_check_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "gpu_check.sh")
WHEELS_SCRIPT = os.path.join(ROOT, "experiments", "gpu_wheels.sh")

# The H200 image's Python packages (/work/.library/device/KINDS.md, "Python packages already there", read
# 2026-11-17 on a machine running it). What the stages import beyond these must travel as a wheel.
DEVICE_PACKAGES = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())
# Imported here only because this machine has them: jax loads libtpu when it is installed (not on a GPU image).
HOST_ONLY = {"libtpu"}


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _stage_commands() -> list[list[str]]:
  """Each `stage NAME BUDGET CMD...` line of the script (continuations joined), as argv lists."""
  text = open(SCRIPT).read().replace("\\\n", " ")
  commands = []
  for line in text.splitlines():
    if line.startswith("stage "):
      argv = shlex.split(line.split("<<", 1)[0])
      commands.append(argv[3:])
  return commands


def _python_modules() -> dict[str, list[str]]:
  """{module run with -m: [flag names it is given]} over every stage (active or commented out: not these)."""
  modules: dict[str, list[str]] = {}
  for argv in _stage_commands():
    if "-m" not in argv:
      continue
    i = argv.index("-m")
    flags = [a[2:].split("=", 1)[0] for a in argv[i + 2:] if a.startswith("--")]
    modules.setdefault(argv[i + 1], []).extend(flags)
  return modules


def _wheels() -> dict[str, str]:
  text = open(WHEELS_SCRIPT).read()
  block = re.search(r"WHEELS=\((.*?)\)", text, re.S).group(1)
  return dict(spec.split("==") for spec in block.split())


def test_scripts_are_valid_bash():
  for path in (SCRIPT, WHEELS_SCRIPT):
    subprocess.run(["bash", "-n", path], check=True)


def test_stages_and_budget():
  modules = _python_modules()
  assert set(modules) == {"experiments.bench_model", "experiments.bench_trim", "experiments.bench_train",
                          "medcg.compile"}, modules
  budgets = [int(line.split()[2]) for line in open(SCRIPT) if line.startswith("stage ")]
  total = int(re.search(r"GPU_CHECK_TOTAL_S:-(\d+)", open(SCRIPT).read()).group(1))
  assert sum(budgets) <= total <= 480, (budgets, total)  # every stage gets its slot inside 8 minutes
  call = re.search(r"timeout_s=(\d+)", open(SCRIPT).read())
  assert call and total < int(call.group(1)) <= 600


def test_every_module_exists():
  for module in _python_modules():
    assert importlib.util.find_spec(module) is not None, f"gpu_check.sh runs a missing module: {module}"


def test_every_flag_is_accepted():
  """`python -m MODULE --help` of each module lists every flag the script passes (absl --[no]x included)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  modules = _python_modules()
  procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for m in modules}
  for module, proc in procs.items():
    out, _ = proc.communicate(timeout=120)
    known = set(re.findall(r"--(?:\[no\])?([A-Za-z][\w-]*)", out))
    assert known, f"{module} --help printed no flags:\n{out[-2000:]}"
    for flag in modules[module]:
      name = flag[2:] if flag.startswith("no") and flag[2:] in known else flag
      assert name in known, f"gpu_check.sh passes --{flag} to {module}, whose --help does not list it"


def test_wheels_cover_the_stages_imports():
  """Distributions the stages import, less the image's packages, are exactly what gpu_wheels.sh fetches."""
  probe = r"""
import importlib, importlib.metadata as md, json, pkgutil, sys
mods = ["experiments.bench_trim", "experiments.bench_train", "medcg.compile", "configs.models",
        "configs.cg_table3", "medcg.model.vlm", "medcg.kernels.trim_pallas", "medcg.train.mfu",
        "medcg.train.trainer"]
import medcg.aot
mods += ["medcg.aot." + m.name for m in pkgutil.iter_modules(medcg.aot.__path__)]
for m in mods:
  importlib.import_module(m)  # bench_model imports a subset of bench_trim's (and clashes with its flags)
tops = {}
for name, mod in list(sys.modules.items()):
  tops.setdefault(name.split(".")[0], set()).add(name)
pd = md.packages_distributions()
dists = set()
for top, names in tops.items():
  cands = pd.get(top, [])
  if len(cands) == 1:
    dists.add(cands[0])
  elif cands:  # a namespace package (google.*): the distribution that holds an imported submodule's file
    for d in cands:
      files = {str(f).replace("\\", "/") for f in (md.distribution(d).files or [])}
      subs = {n.split(".")[1] for n in names if n.count(".") >= 1 and getattr(sys.modules[n], "__file__", None)}
      if any(f.startswith(f"{top}/{s}/") or f == f"{top}/{s}.py" or f.startswith(f"{top}/{s}.") for s in subs
             for f in files):
        dists.add(d)
print(json.dumps(sorted(dists)))
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, text=True, capture_output=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  imported = {_norm(d) for d in json.loads(out.stdout.strip().splitlines()[-1])}
  missing = imported - {_norm(p) for p in DEVICE_PACKAGES} - HOST_ONLY
  wheels = {_norm(name) for name in _wheels()}
  assert missing <= wheels, f"imported on the GPU path, not on the image, no wheel: {sorted(missing - wheels)}"
  assert not wheels & {_norm(p) for p in DEVICE_PACKAGES}, "a wheel would shadow the image's own package"


def test_wheel_versions_match_requirements():
  """The pinned wheels are the direct requirements' versions within requirements.txt's ranges."""
  from packaging.requirements import Requirement
  reqs = {}
  for line in open(os.path.join(ROOT, "requirements.txt")):
    line = line.split("#", 1)[0].strip()
    if line:
      req = Requirement(line)
      reqs[_norm(req.name)] = req.specifier
  wheels = _wheels()
  assert {"ml-collections", "grain", "array-record"} <= {_norm(n) for n in wheels}
  for name, version in wheels.items():
    if _norm(name) in reqs:  # portpicker comes in through grain
      assert reqs[_norm(name)].contains(version), f"{name}=={version} is outside requirements.txt's range"


def test_bench_trim_check_runs_on_cpu(tmp_path):
  """The correctness check of part (a) end to end at toy size: every row passes and the verdict is written."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  subprocess.run([sys.executable, "-m", "experiments.bench_trim", "--nomodel_part", "--batches=2",
                  "--modes=iqr_example,ratio", "--n=16", "--d=8", "--e=4", "--k_max=4", "--reps=1",
                  f"--out={tmp_path}"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
  report = json.loads((tmp_path / "bench_trim_cpu.json").read_text())
  assert report["status"] == "done" and report["kernel_verdict"]["correct"], report["kernel_verdict"]
  assert {r["mode"] for r in report["kernel"]} == {"iqr_example", "ratio"}
  assert all(r["check"] == "pass" and r["same_count_as_xla"] for r in report["kernel"])


def _write(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


def test_summary_reads_partial_results(tmp_path):
  work, out = tmp_path / "work", tmp_path / "out"
  work.mkdir()
  (work / "stages.tsv").write_text("env\tok\t0\t9\t25\ntrim_kernel\tok\t0\t40\t50\n"
                                   "train_off\tTIMEOUT after 90s\t124\t90\t90\n")
  _write(work / "env.json", {"gpu": "NVIDIA H200", "jax": "0.11.2", "python": "3.12.3"})
  _write(work / "bench_trim_kernel" / "bench_trim_gpu.json", {"kernel": [], "kernel_verdict": {
      "checks": 9, "failed": ["pallas_gpu ratio B=32"], "correct": False, "speed_batch": 32,
      "speedup": {"pallas_gpu iqr_batch": 2.0}, "speed_met": True}})
  _write(work / "bench_train_off" / "bench_train_gpu_nvidia_h200.json", {"rows": [
      {"trim": "off", "batch": 16, "status": "ok", "mfu": 0.41, "step_s": 0.2},
      {"trim": "off", "batch": 32, "status": "ok", "mfu": 0.47, "step_s": 0.35}]})
  _write(work / "bench_train_trim" / "bench_train_gpu_nvidia_h200.json", {"rows": [
      {"trim": "ratio", "batch": 32, "status": "ok", "mfu": 0.3, "step_s": 0.175}]})
  assert gpu_check_summary.main([str(work), str(out)]) == 0
  summary = json.loads((out / "summary.json").read_text())
  met = {t["target"]: t["met"] for t in summary["targets"]}
  assert met["TRIM kernel == xla (B 1, 8, 32; 3 modes)"] is False
  assert met["bench_train MFU >= 45% with TRIM off"] is True
  assert met["prefill >= 2.5x with ratio TRIM (~121 tokens vs 576)"] is None  # not measured
  trim = next(t for t in summary["targets"] if t["target"].startswith("bench_train step with TRIM"))
  assert trim["value"]["ratio b32"]["speedup_vs_off"] == pytest.approx(2.0)
  md = (out / "summary.md").read_text()
  assert "TIMEOUT after 90s" in md and "**NO**" in md
