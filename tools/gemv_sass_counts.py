"""Instructions per weight in the K loop of the CUDA LUT GEMV at M = 1 (sm_90 SASS).

A compile-time fact, no GPU needed: csrc/cuda/lut_gemv.cu is built with nvcc for sm_90
with the vector x path taken, and the one-row kernels (MAX_M = 1, what M = 1 runs) are
read, so the K loop holds only what M = 1 executes on full groups. The loop is the
function's longest backward branch; a lane decodes kRowsPerWarp × 32 = 128 weights per trip.

    .venv/bin/python tools/gemv_sass_counts.py [CSRC_DIR]   # default: this checkout's csrc
"""

import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton

ROOT = Path(__file__).resolve().parent.parent
CUOBJDUMP = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
WEIGHTS_PER_TRIP = 4 * 32
EDITS = {  # file -> (texts, the first found is replaced by new): the vector x path
    "cuda/lut_gemv.cu": (["  if (vec) {", "  if (vec && k0 + kSub <= k) {"], "  if (true) {"),
}
FP16_KERNEL = re.compile(r"lut_gemv_kernelI6__halfLi(\d)E(Lb([01])E)?Li1E")  # MAX_M = 1


def build_sass(csrc: Path, work: Path) -> str:
    """nvcc + cuobjdump of the edited lut_gemv.cu; returns the SASS text."""
    src = work / "csrc"
    shutil.copytree(csrc, src)
    for rel, (texts, new) in EDITS.items():
        path = src / rel
        body = path.read_text()
        text = next((t for t in texts if t in body), None)
        if text is None:
            sys.exit(f"{rel}: none of {texts} found; update EDITS for this source")
        path.write_text(body.replace(text, new))
    obj = work / "lut_gemv.o"
    subprocess.run(["nvcc", "-std=c++17", "-O2", f"-I{src}", "-gencode",
                    "arch=compute_90,code=sm_90", "-c", str(src / "cuda/lut_gemv.cu"),
                    "-o", str(obj)], check=True)
    return subprocess.run([str(CUOBJDUMP), "-sass", str(obj)], check=True,
                          capture_output=True, text=True).stdout


def k_loop(function: str) -> list[str]:
    """Opcodes of the longest backward-branch loop of one function's SASS."""
    ins = [(int(a, 16), op.strip()) for a, op in
           re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", function)]
    best: list[str] = []
    for addr, op in ins:
        target = re.search(r"\bBRA\s+(?:\S+\s+)?0x([0-9a-f]+)", op)
        if target and int(target.group(1), 16) < addr:
            body = [o for a, o in ins if int(target.group(1), 16) <= a <= addr]
            best = max(best, body, key=len)
    return [(o.split()[1] if o.startswith("@") else o.split()[0]).split(".")[0] for o in best]


def main() -> None:
    csrc = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "csrc"
    with tempfile.TemporaryDirectory() as tmp:
        sass = build_sass(csrc.resolve(), Path(tmp))
    print("fp16 bits  layout   K-loop instr  per weight  top opcodes")
    for function in re.split(r"\n\s*Function : ", sass)[1:]:
        name = FP16_KERNEL.search(function.split("\n", 1)[0])
        if name is None:
            continue
        layout = {None: "either", "0": "layer", "1": "channel"}[name.group(3)]
        ops = k_loop(function)
        top = ", ".join(f"{op} {n}" for op, n in collections.Counter(ops).most_common(5))
        print(f"     {name.group(1):5} {layout:8} {len(ops):12d} "
              f"{len(ops) / WEIGHTS_PER_TRIP:11.2f}  {top}")


if __name__ == "__main__":
    main()
