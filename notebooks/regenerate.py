"""Re-run the notebooks in full (not smoke) mode and store their outputs in the files, so
that their plots and numbers show on a code host without running anything.

    python notebooks/regenerate.py              # every notebook
    python notebooks/regenerate.py quickstart   # the ones whose name contains a word
    python notebooks/regenerate.py --smoke      # the short smoke-mode run (a slow machine)

The test suite runs the same notebooks in smoke mode (QALORA_SMOKE=1) without writing them.
Outputs are scrubbed of this machine's paths (the home directory becomes ~) and of timing
metadata, so a re-run changes only what the notebooks compute.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent


def scrub(nb) -> None:
    home = os.path.expanduser("~")
    replacements = [(str(REPO), "."), (home, "~")]
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                continue  # progress bars and warnings: noise in a stored notebook
            if "text" in out:
                for old, new in replacements:
                    out["text"] = out["text"].replace(old, new)
            for mime in ("text/plain", "text/markdown"):
                if mime in out.get("data", {}):
                    for old, new in replacements:
                        out["data"][mime] = out["data"][mime].replace(old, new)
            kept.append(out)
        cell["outputs"] = kept


def main(argv: list[str]) -> int:
    env = os.environ
    smoke = "--smoke" in argv
    argv = [a for a in argv if a != "--smoke"]
    if smoke:
        env["QALORA_SMOKE"] = "1"
    else:
        env.pop("QALORA_SMOKE", None)
    env["QALORA_NO_PROGRESS"] = "1"
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    paths = sorted(HERE.glob("*.ipynb"))
    if argv:
        paths = [p for p in paths if any(word in p.stem for word in argv)]
    for path in paths:
        started = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(
            nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
        ).execute()
        errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        if errors:
            print(f"{path.name}: a cell raised {errors[0].get('ename')}; not written", file=sys.stderr)
            return 1
        scrub(nb)
        nb.metadata["qalora_outputs"] = "smoke mode (two training steps)" if smoke else "full run"
        nbformat.write(nb, path)
        print(f"{path.name}: executed and written in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
