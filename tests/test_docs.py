"""The docs as a newcomer uses them: every Python snippet runs as written, every JSON and ini snippet parses, and
every ini key or fixture name they mention exists (docs/guide.md once named a key pytest only warned about).

Python blocks of one page run top to bottom as one script in an empty directory, in a fresh interpreter; a block
preceded by ``<!-- not run: why -->`` (it needs the reader's own model) is only compiled.
"""
from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_ait_llm import plugin
from pytest_ait_llm.mapping.rules import load_mapping_file
from pytest_ait_llm.settings import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/guide.md", "docs/plugin.md", "docs/writing-a-port.md", "docs/quickstart.zh.md"]
FENCE = re.compile(r"(?:<!-- not run: (?P<why>[^>]*) -->\n)?^```(?P<lang>\w*)\n(?P<body>.*?)^```", re.S | re.M)

INI_KEYS = {opt.ini for opt in OPTIONS}
#: names a reader may meet in backquotes: ini keys, fixtures (ait_golden_model is the user's), parameters, marker
NAMES = INI_KEYS | {"ait_golden_model", "ait_exec_run", "ait_llm_session_dir", "ait_token", "ait_rank",
                    plugin.MARKER, plugin.CSV_PROPERTY, plugin.VERDICT_PROPERTY}


def blocks(doc: str, lang: str) -> list[tuple[str, str | None]]:
    text = (ROOT / doc).read_text(encoding="utf-8")
    return [(m["body"], m["why"]) for m in FENCE.finditer(text) if m["lang"] == lang]


@pytest.mark.parametrize("doc", DOCS)
def test_python_snippets_run(doc, tmp_path):
    snippets = blocks(doc, "python")
    for i, (body, _) in enumerate(snippets):
        compile(body, f"{doc} python block {i + 1}", "exec")
    script = "\n\n".join(body for body, why in snippets if why is None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{doc}:\n{proc.stderr[-3000:]}"


def test_the_port_page_compares_what_it_writes():
    """The page that documents AtbDumpWriter ends with a comparison that passes and one that names the bug."""
    script = "\n".join(body for body, _ in blocks("docs/writing-a-port.md", "python"))
    assert "assert result.passed" in script and 'first_divergence.atb_op == "0_TinyLayer/1_LinearOperation"' in script


@pytest.mark.parametrize("doc", DOCS)
def test_json_snippets_parse_and_mapping_files_load(doc, tmp_path):
    for body, _ in blocks(doc, "json"):
        obj = json.loads(body)
        if "nodes" not in obj:  # an op_mapping_file.json: the loader must accept it as shown
            (tmp_path / "op_mapping_file.json").write_text(body)
            assert load_mapping_file(tmp_path)


@pytest.mark.parametrize("doc", DOCS)
def test_ini_snippets_use_real_keys(doc):
    for body, _ in blocks(doc, "ini"):
        parser = configparser.ConfigParser()
        parser.read_string(body)
        ours = {k for k in parser["pytest"] if k.startswith(("ait", "op_mapping"))}
        assert ours <= INI_KEYS, f"{doc}: unknown ini keys {ours - INI_KEYS}"


@pytest.mark.parametrize("doc", DOCS + ["examples/llama_port/README.md"])
def test_every_ait_name_in_the_docs_exists(doc):
    """A page may show a wrong name only as the misspelling the usage error answers ("did you mean ...")."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    for match in re.finditer(r"`(ait_[a-z_]+)`", text):
        shown_as_error = "did you mean" in text[match.end():match.end() + 40]
        assert match[1] in NAMES or shown_as_error, f"{doc} names `{match[1]}`, which the plugin does not know"
