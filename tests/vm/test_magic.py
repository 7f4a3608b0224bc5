"""%%smolvm from an ordinary IPython shell and from a real ipykernel."""

from __future__ import annotations

import pytest
from jupyter_client.manager import start_new_kernel


@pytest.fixture(scope="module")
def shell(image):
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "smolvm_kernel")
    yield ip
    ip.run_line_magic("unload_ext", "smolvm_kernel")
    InteractiveShell.clear_instance()


def test_cell_runs_in_the_vm_and_state_persists_per_name(shell, capsys):
    shell.user_ns["host_secret"] = "must not leak"
    shell.run_cell_magic("smolvm", "--name a", "import os\nprint(os.uname().release)\nv = 21")
    out = capsys.readouterr().out
    assert "cloud-amd64" in out
    shell.run_cell_magic("smolvm", "--name a", "print(v * 2)\nprint('host_secret' in globals())")
    out = capsys.readouterr().out
    assert "42" in out and "False" in out
    assert "v" not in shell.user_ns          # the host namespace is untouched


def test_guest_errors_show_the_guest_traceback(shell, capsys):
    result = shell.run_cell("%%smolvm --name a\nraise ValueError('from the guest')")
    assert result.error_in_exec is not None
    assert "from the guest" in str(result.error_in_exec)


def test_config_lines_are_the_kernels_grammar_and_refusals_are_on_record(shell, capsys):
    """`%smolvm config` reads as in the SmolVM kernel (one parser) and applies
    through the panel's actions; a refused value is written to the audit log."""
    from smolvm_kernel.jupyter import magics

    shell.run_line_magic("smolvm", "config --name a")
    assert "cell timeout" in capsys.readouterr().out
    shell.run_line_magic("smolvm", "config --name a --timeout 30")
    assert "without a restart" in capsys.readouterr().out
    assert magics._sandboxes["a"].config.exec_timeout == 30
    too_much = magics._sandboxes["a"].config.max_mem_mib + 1        # this host's limit, plus one
    with pytest.raises(Exception, match="limit of" if too_much <= 65536 else "out of range"):
        shell.run_line_magic("smolvm", f"config --name a --mem {too_much}")
    refused = [e for e in magics._sandboxes["a"].audit.read() if e["event"] == "refused"]
    assert refused and refused[-1]["what"] == f"memory {too_much} MiB"


def test_status_and_list(shell, capsys):
    shell.run_line_magic("smolvm", "status --name a")
    assert "state      ready" in capsys.readouterr().out
    shell.run_line_magic("smolvm", "list")
    assert "a " in capsys.readouterr().out
    shell.run_line_magic("smolvm", "stop --name a")
    assert "stopped" in capsys.readouterr().out


def test_magic_inside_a_real_ipykernel(image, notebook_dir):
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60, cwd=str(notebook_dir))
    try:
        outs = []
        kc.execute_interactive("%load_ext smolvm_kernel", timeout=30)
        reply = kc.execute_interactive(
            "%%smolvm\nfrom IPython.display import HTML, display\nprint('in vm')\ndisplay(HTML('<b>x</b>'))",
            output_hook=outs.append, timeout=180)
        assert reply["content"]["status"] == "ok"
        streams = "".join(m["content"].get("text", "") for m in outs if m["msg_type"] == "stream")
        assert "in vm" in streams
        assert any(m["msg_type"] == "display_data" and "text/html" in m["content"]["data"] for m in outs)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def test_panel_and_push_pull_from_an_ordinary_ipykernel(image, tmp_path):
    from panel_client import PanelClient

    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60, cwd=str(tmp_path))
    client = PanelClient(kc)
    try:
        client.run("%load_ext smolvm_kernel")
        assert client.run("%%smolvm --name p\nopen('/tmp/marker', 'w').write('x')")[0]["status"] == "ok"
        (tmp_path / "in.txt").write_text("from the host folder")
        assert client.run("%smolvm push in.txt --name p")[0]["status"] == "ok"
        content, outs = client.run("%%smolvm --name p\nprint(open('in.txt').read().upper())")
        assert "FROM THE HOST FOLDER" in "".join(m["content"].get("text", "") for m in outs)
        client.run("%%smolvm --name p\nopen('/tmp/o.txt', 'w').write('out')")
        assert client.run("%smolvm pull /tmp/o.txt --name p")[0]["status"] == "ok"
        assert (tmp_path / "o.txt").read_text() == "out"
        content, _ = client.run("%smolvm push ../x --name p")
        assert content["status"] == "error" and "outside the notebook's folder" in content["evalue"]

        content, outs = client.run("%smolvm panel --name p")
        assert content["status"] == "ok"
        assert any("application/vnd.jupyter.widget-view+json" in m["content"].get("data", {})
                   for m in outs if m["msg_type"] == "display_data")
        client.pump(lambda: client.state() == "ready", timeout=30)
        client.confirm("Reset")
        client.pump(lambda: client.state() == "booting", timeout=30)
        client.pump(lambda: client.state() == "ready", timeout=180)
        content, outs = client.run("%%smolvm --name p\nimport os; print(os.path.exists('/tmp/marker'))")
        assert "False" in "".join(m["content"].get("text", "") for m in outs)
        client.confirm("Teardown")
        client.pump(lambda: client.state() == "stopped", timeout=60)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
