"""The demo: execute notebooks/demo.ipynb under SmolVM Python and show what came back.

``smolvm-kernel demo`` installs the ``smolvm-scipy`` kernelspec if needed,
runs every cell with nbclient (each in the notebook's microVM), prints a
summary of the outputs and saves the executed notebook beside the original.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_NOTEBOOK = REPO / "notebooks" / "demo.ipynb"


def ensure_kernelspec(name: str, **options) -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    from smolvm_kernel.jupyter import kernelspec

    try:
        KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        path = kernelspec.install(name, prefix=sys.prefix, **options)
        print(f"[smolvm] installed kernelspec {name} in {path}")


def summarize(output: dict) -> str:
    kind = output.get("output_type")
    if kind == "stream":
        return output.get("text", "").rstrip()
    if kind == "error":
        return f"ERROR {output.get('ename')}: {output.get('evalue')}"
    data = output.get("data", {})
    if "application/vnd.jupyter.widget-view+json" in data:
        return "[widget] " + data.get("text/plain", "")
    if "image/png" in data:
        return f"[image/png, {len(data['image/png']) * 3 // 4 // 1024} KiB]"
    for mime, label in (("text/latex", "latex"), ("text/html", "html")):
        if mime in data and (data.get("text/plain", "").startswith("<IPython") or "text/plain" not in data):
            return f"[{label}] " + data[mime].strip().replace("\n", " ")[:80]
    return data.get("text/plain", str(sorted(data)))


def run_notebook(path: Path, out_path: Path, kernel_name: str, timeout: int = 300):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=timeout,
                            startup_timeout=120, resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    nbformat.write(nb, out_path)
    return nb


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="smolvm-kernel demo")
    ap.add_argument("notebook", nargs="?", type=Path, default=DEFAULT_NOTEBOOK)
    ap.add_argument("--kernel", default="smolvm-scipy")
    args = ap.parse_args(argv)
    ensure_kernelspec(args.kernel, profile="scipy")
    out_path = args.notebook.with_name(args.notebook.stem + ".executed.ipynb")
    t0 = time.monotonic()
    print(f"[smolvm] executing {args.notebook} with kernel {args.kernel} (each cell in a microVM)")
    nb = run_notebook(args.notebook, out_path, args.kernel)
    failed = False
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        first = cell.source.splitlines()[0] if cell.source else ""
        print(f"\nIn [{i + 1}]: {first}")
        for output in cell.get("outputs", []):
            failed = failed or output.get("output_type") == "error"
            for line in summarize(output).splitlines()[:8]:
                print(f"    {line}")
    print(f"\n[smolvm] done in {time.monotonic() - t0:.1f} s; executed notebook: {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
