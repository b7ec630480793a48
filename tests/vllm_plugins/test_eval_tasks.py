"""The local lm-eval tasks, their data builders and ``vllm-plugins eval``'s table and
errors; no engine (the end-to-end slice is ``test_eval_e2e.py``)."""

from __future__ import annotations

import re

import pytest

from vllm_plugins.cli import main
from vllm_plugins.evaluation import runner
from vllm_plugins.evaluation.tasks import data


def test_lastword_rows_are_held_out_paragraph_endings(shared_dir):
    text = (shared_dir / "data" / "tinystories_val.txt").read_text(encoding="utf-8")
    rows = data.last_word_rows(text)
    assert len(rows) > 1000
    for row in rows[:200]:
        assert re.fullmatch(r" [A-Za-z]+", row["target"])
        assert (row["context"] + row["target"]) in text
        assert len(row["context"].split()) >= 14


def test_wikitext_documents_cover_the_test_split(shared_dir):
    text = (shared_dir / "data" / "wikitext2_test.txt").read_text(encoding="utf-8")
    docs = data.wikitext_documents(text)
    assert len(docs) == 62  # articles of wikitext-2 test, as in EleutherAI/wikitext_document_level
    assert docs[0]["page"].startswith(" = Robert Boulter = ")
    assert all(re.match(r" = [^=].* = ", d["page"]) for d in docs)
    words = lambda s: s.split()  # noqa: E731
    assert sum(len(words(d["page"])) for d in docs) == len(words(text.replace("\r\n", "\n")))


def test_lm_eval_loads_the_local_tasks(shared_dir):
    from lm_eval.tasks import get_task_dict

    settings = runner.EvalSettings(shared_dir=shared_dir)
    tasks = get_task_dict(list(runner.TASKS), runner.task_manager(settings))
    lastword, wiki = tasks["tinystories_lastword"], tasks["wikitext2_ppl"]
    doc = next(iter(lastword.test_docs()))
    assert lastword.OUTPUT_TYPE == "loglikelihood" and wiki.OUTPUT_TYPE == "loglikelihood_rolling"
    assert lastword.doc_to_text(doc) == doc["context"] and lastword.doc_to_target(doc) == doc["target"]
    assert len(list(wiki.test_docs())) == 62


def test_text_tasks_read_a_local_file(tmp_path):
    """--text: the main job's tasks, from a generated file and no ../shared."""
    from lm_eval.tasks import get_task_dict

    from models.tiny import synthetic_corpus

    stories = synthetic_corpus(20, seed=5)
    path = tmp_path / "heldout.txt"
    path.write_text("\n\n".join(stories) + "\n")
    settings = runner.EvalSettings(shared_dir=tmp_path / "absent", text_file=path)
    tasks = get_task_dict(list(runner.TEXT_TASKS), runner.task_manager(settings))
    lastword, ppl = (list(tasks[t].test_docs()) for t in runner.TEXT_TASKS)
    assert [d["page"] for d in ppl] == stories
    assert len(lastword) == len(stories)  # every story ends in "... the <adj> <thing>."
    for doc, story in zip(lastword, stories):
        assert story == doc["context"] + doc["target"] + "."


def test_recovery_table_math():
    results = {
        "fp": {"tinystories_lastword": {"acc": 0.5, "perplexity": 10.0},
               "wikitext2_ppl": {"word_perplexity": 100.0, "bits_per_byte": 2.0}},
        "w4": {"tinystories_lastword": {"acc": 0.4, "perplexity": 12.5},
               "wikitext2_ppl": {"word_perplexity": 125.0, "bits_per_byte": 2.5}},
    }
    table = runner.recovery_table(results, "fp").splitlines()
    assert table[2].startswith("| fp | 0.5000 | 100.0 | 10.0000 | 100.0 |")
    assert table[3] == "| w4 | 0.4000 | 80.0 | 12.5000 | 80.0 | 125.0000 | 80.0 | 2.5000 | 80.0 |"


@pytest.mark.parametrize("argv, message", [
    (["--model", "nolabel"], "expected LABEL=DIR"),
    (["--model", "fp=/nonexistent"], "has no config.json"),
    (["--model", "fp={tiny}", "--tasks", "mmlu"], "unknown ['mmlu']"),
    (["--model", "fp={tiny}", "--model", "w4={tiny}", "--base-url", "http://x"], "exactly one --model"),
    (["--model", "fp={tiny}", "--shared-dir", "/nonexistent"], "--shared-dir"),
    (["--model", "fp={tiny}", "--text", "/nonexistent.txt"], "--text: /nonexistent.txt not found"),
    (["--model", "fp={tiny}", "--tasks", "text_ppl"], "need --text FILE"),
])
def test_eval_cli_rejects_bad_input(argv, message, tiny_llama, capsys):
    argv = [a.replace("{tiny}", str(tiny_llama())) for a in argv]
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert "vllm-plugins eval: error:" in err and message in err, err
