"""train/tasks: metrics against hand-computed cases, and the generators' determinism, disjoint splits and
answers that agree with their passages / databases / arithmetic."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from pathlib import Path

import pytest

from train.tasks import TASKS, read_split
from train.tasks.base import accuracy, numbers_in
from train.tasks.boolq import BoolQ
from train.tasks.copa import PAIRS, choice_accuracy
from train.tasks.hsm import numeric_accuracy
from train.tasks.q2sql import DB_NAME, execution_accuracy, run_query
from train.tasks.squad import f1_em, normalize_answer, token_f1
from train.tasks.words import NAMES

SMALL = {"n_train": 60, "n_dev": 10, "n_test": 10}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("tasks")
    return {name: task.generate(root / name, seed=0, **SMALL) for name, task in TASKS.items()}


def records(paths: dict[str, Path]) -> list[dict]:
    return [r for split in ("train", "dev", "test") for r in read_split(paths[split])]


# ---- metrics ---------------------------------------------------------------------------------------------
def test_squad_normalisation():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day; the end.") == "apple day end"
    assert normalize_answer("Theatre and anthem") == "theatre and anthem"  # articles only as whole words
    assert f1_em("the Paris.", {"response": "Paris", "answer": "Paris"}) == 1.0
    assert f1_em("  a baker ", {"response": "baker"}) == 1.0  # no "answer": falls back to the response


def test_f1_em_partial_overlap_by_hand():
    # "red big house" vs "big red barn": 2 common tokens, P = R = 2/3, F1 = 2/3, EM = 0 -> 1/3
    assert token_f1("the red big house", "a big red barn") == pytest.approx(2 / 3)
    assert f1_em("the red big house", {"response": "", "answer": "a big red barn"}) == pytest.approx(1 / 3)
    # 4 predicted tokens, 2 gold, 2 common: P = 1/2, R = 1, F1 = 2/3
    assert token_f1("fresh bread and milk", "fresh bread") == pytest.approx(2 / 3)
    # repeated tokens count as a multiset: "oak oak" vs "oak": P = 1/2, R = 1, F1 = 2/3
    assert token_f1("oak oak", "oak") == pytest.approx(2 / 3)
    assert f1_em("", {"response": "", "answer": "Oslo"}) == 0.0
    assert f1_em("Rome", {"response": "", "answer": "Oslo"}) == 0.0


def test_numeric_accuracy():
    gold = {"response": "5 + 7 = 12. The answer is 12.", "answer": 12}
    assert numeric_accuracy("The answer is 12.", gold) == 1.0
    assert numeric_accuracy("5 + 7 = 12. The answer is 12.", gold) == 1.0
    assert numeric_accuracy("12 apples, or maybe 13", gold) == 0.0  # the last number counts
    assert numeric_accuracy("twelve", gold) == 0.0
    assert numeric_accuracy("The answer is 12.0", gold) == 1.0
    assert numeric_accuracy("It is 1,200.", {"response": "", "answer": 1200}) == 1.0
    assert numeric_accuracy("The answer is 12", {"response": "so 12."}) == 1.0  # gold from the response
    assert numbers_in("-3 and 4.5, then 7.") == [-3.0, 4.5, 7.0]


def test_accuracy_reads_the_first_word():
    assert accuracy("Yes, it does.", {"response": "yes", "answer": "yes"}) == 1.0
    assert accuracy("no", {"response": "yes"}) == 0.0
    assert accuracy("", {"response": "yes"}) == 0.0
    assert accuracy("2.", {"response": "2", "answer": "2"}) == 1.0
    assert accuracy("1: the glass broke", {"response": "2", "answer": "2"}) == 0.0
    yes_no = {"response": "no", "answer": "no", "labels": ["yes", "no"]}
    assert accuracy("Answer: No, she does not.", yes_no) == 1.0  # the first label word counts
    assert accuracy("Answer: No", {"response": "no"}) == 0.0  # without labels: the first word
    assert accuracy("I do not know", yes_no) == 0.0 and accuracy("Yes and no", yes_no) == 0.0
    assert accuracy("The answer is 2.", {"response": "2", "labels": ["1", "2"]}) == 1.0


@pytest.fixture(scope="module")
def sql_db(generated) -> str:
    return str((generated["q2sql"]["train"].parent / DB_NAME).resolve())


def test_sql_execution_accuracy(sql_db):
    city = run_query(sql_db, "SELECT city FROM people GROUP BY city ORDER BY COUNT(*) DESC LIMIT 1")[0][0]
    rec = {"response": "", "db": sql_db, "sql": f"SELECT name FROM people WHERE city = '{city}'"}
    assert execution_accuracy(rec["sql"], rec) == 1.0
    # equivalent but different: alias, other order, trailing semicolon, lower case
    assert execution_accuracy(f"select p.name from people as p where p.city = '{city}' order by p.name desc;", rec) == 1
    assert execution_accuracy(f"```sql\nSELECT name FROM people WHERE city IN ('{city}')\n```", rec) == 1.0
    assert execution_accuracy(f"SELECT name FROM people WHERE city <> '{city}'", rec) == 0.0  # another result
    assert execution_accuracy(f"SELECT name, age FROM people WHERE city = '{city}'", rec) == 0.0  # extra column
    for bad in ("SELEC name FRM people", "SELECT nme FROM people", "", "the names of people in Oslo"):
        assert execution_accuracy(bad, rec) == 0.0
    count = {"response": "", "db": sql_db, "sql": "SELECT COUNT(*) FROM people WHERE age > 30"}
    assert execution_accuracy("SELECT COUNT(id) FROM people WHERE NOT age <= 30", count) == 1.0
    assert execution_accuracy("SELECT SUM(age > 30) * 1.0 FROM people", count) == 1.0  # 7 == 7.0
    # ordered gold: the order matters
    oldest = {"response": "", "db": sql_db, "sql": "SELECT name FROM people ORDER BY salary DESC LIMIT 1"}
    assert execution_accuracy("SELECT name FROM people WHERE salary = (SELECT MAX(salary) FROM people)", oldest) == 1
    assert execution_accuracy("SELECT name FROM people ORDER BY salary ASC LIMIT 1", oldest) == 0.0


def test_sql_cannot_modify_the_database(sql_db, tmp_path):
    before = hashlib.sha256(Path(sql_db).read_bytes()).hexdigest()
    files = sorted(Path(sql_db).parent.iterdir())
    rec = {"response": "", "db": sql_db, "sql": "SELECT COUNT(*) FROM people"}
    attach = tmp_path / "new.db"
    for attack in (
        "DROP TABLE people",
        "DELETE FROM people",
        "UPDATE people SET age = 0",
        "INSERT INTO people (name) VALUES ('x')",
        "CREATE TABLE t (x)",
        "SELECT COUNT(*) FROM people; DROP TABLE people",
        f"ATTACH DATABASE '{attach}' AS x",
        "PRAGMA writable_schema = 1",
        "VACUUM",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c",  # never ends
    ):
        assert execution_accuracy(attack, rec) == 0.0, attack
    assert hashlib.sha256(Path(sql_db).read_bytes()).hexdigest() == before
    assert sorted(Path(sql_db).parent.iterdir()) == files and not attach.exists()
    with sqlite3.connect(sql_db) as con:
        assert con.execute("SELECT COUNT(*) FROM people").fetchone()[0] == len(NAMES)


def test_sql_missing_database_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such database"):
        execution_accuracy("SELECT 1", {"response": "SELECT 1", "db": str(tmp_path / "gone.sqlite")})


# ---- generators ------------------------------------------------------------------------------------------
def _comparable(paths: dict[str, Path]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "db"} for r in records(paths)]  # db: an absolute path


@pytest.mark.parametrize("name", list(TASKS))
def test_generators_deterministic_and_disjoint(name, generated, tmp_path):
    task, paths = TASKS[name], generated[name]
    again = task.generate(tmp_path / "again", seed=0, **SMALL)
    other = task.generate(tmp_path / "other", seed=1, **SMALL)
    assert _comparable(again) == _comparable(paths)
    assert _comparable(other) != _comparable(paths)
    splits = {s: [r["prompt"] for r in read_split(p)] for s, p in paths.items()}
    assert {s: len(v) for s, v in splits.items()} == {"train": 60, "dev": 10, "test": 10}
    prompts = [p for v in splits.values() for p in v]
    assert len(set(prompts)) == len(prompts)  # distinct within and across splits
    for r in records(paths):
        assert r["prompt"] and r["response"] and len(r["prompt"].split()) < 80  # short prompts
        assert len(r["response"].split()) <= 30
    if name == "q2sql":  # the database is the same too
        dumps = [list(sqlite3.connect(p["train"].parent / DB_NAME).iterdump()) for p in (paths, again)]
        assert dumps[0] == dumps[1]


def test_default_sizes_generate(tmp_path):
    """Enough distinct items for the default 1000 / 100 / 100 splits of every task."""
    for name, task in TASKS.items():
        paths = task.generate(tmp_path / name, seed=0)
        assert [len(read_split(p)) for p in paths.values()] == [1000, 100, 100], name


BOOLQ_FACTS = {"live in": "lives in", "work as a": "works as a", "own a": "owns a", "play the": "plays the"}


def test_boolq_answers_follow_the_passage(generated):
    recs = records(generated["boolq"])
    for r in recs:
        passage, question = r["prompt"].split("\nQuestion: ")
        m = re.match(r"Does (\w+) (live in|work as a|own a|play the) (\w+)\?", question)
        assert m, question
        who, fact, value = m.groups()
        sentence = next(s for s in passage.split(". ") if s.startswith(who + " "))
        holds = re.search(rf"\b{BOOLQ_FACTS[fact]} {value}\b", sentence) is not None
        assert r["response"] == r["answer"] == ("yes" if holds else "no"), r
    share = sum(r["answer"] == "yes" for r in recs) / len(recs)
    assert 0.3 < share < 0.7


def _canon(text: str) -> str:
    text = re.sub(r"\b(" + "|".join(NAMES) + r")\b", "X", text.replace("{n}", "X").replace("{m}", "X"))
    return text.rstrip(".").lower()


def test_copa_right_choice_is_the_paired_cause_or_effect(generated):
    recs = records(generated["copa"])
    pairs = {(_canon(c), _canon(e)) for c, e in PAIRS}
    for r in recs:
        premise = _canon(re.search(r"Premise: (.*)\n", r["prompt"]).group(1))
        assert r["answer"] in r["choices"] and r["response"] == r["answer"] + "."
        right, wrong = r["answer"], next(c for c in r["choices"] if c != r["answer"])
        assert f"1: {r['choices'][0]}.\n2: {r['choices'][1]}." in r["prompt"]
        assert choice_accuracy(r["response"], r) == 1.0 and choice_accuracy(wrong, r) == 0.0
        if "cause?" in r["prompt"]:
            assert (_canon(right), premise) in pairs and (_canon(wrong), premise) not in pairs
        else:
            assert (premise, _canon(right)) in pairs and (premise, _canon(wrong)) not in pairs
    assert 0.3 < sum(r["answer"] == r["choices"][0] for r in recs) / len(recs) < 0.7  # the right one is first or second


def test_choice_accuracy_names_one_alternative():
    rec = {"answer": "The glass broke", "choices": ["Ann felt sick", "The glass broke"]}
    assert choice_accuracy("The glass broke.", rec) == 1.0
    assert choice_accuracy("the glass  broke!", rec) == 1.0  # case, punctuation and spacing do not count
    assert choice_accuracy("2: The glass broke.", rec) == 1.0 and choice_accuracy("2", rec) == 1.0  # the number
    assert choice_accuracy("Ann felt sick.", rec) == 0.0 and choice_accuracy("1", rec) == 0.0
    assert choice_accuracy("Ann felt sick, then the glass broke.", rec) == 0.0  # both named: no pick
    assert choice_accuracy("The glass", rec) == 0.0 and choice_accuracy("3", rec) == 0.0
    assert choice_accuracy("", rec) == 0.0


def test_boolq_people_sets_the_passage_size(tmp_path):
    two = read_split(BoolQ(people=2).generate(tmp_path / "two", seed=0, **SMALL)["train"])
    assert all(r["prompt"].split("\nQuestion: ")[0].count(". ") == 1 for r in two)  # two sentences
    one = read_split(BoolQ().generate(tmp_path / "one", seed=0, **SMALL)["train"])
    assert all(r["prompt"].split("\nQuestion: ")[0].count(". ") == 0 for r in one)  # one by default
    with pytest.raises(ValueError, match="people must be 1..4"):
        BoolQ(people=5)


def test_squad_answers_are_spans_of_the_passage(generated):
    for r in records(generated["squad"]):
        assert r["answer"] == r["response"] and r["answer"] in r["context"]
        assert r["prompt"].startswith(r["context"])
        assert f1_em(r["response"], r) == 1.0


def test_sql_gold_executes_with_a_result(generated):
    recs = records(generated["q2sql"])
    assert all(Path(r["db"]).is_file() and r["sql"] == r["response"] for r in recs)
    non_empty = [r for r in recs if run_query(r["db"], r["sql"])]
    assert len(non_empty) == len(recs)
    assert all(execution_accuracy(r["response"], r) == 1.0 for r in recs)
    assert len({r["sql"].split(" WHERE")[0] for r in recs}) >= 4  # several query shapes


def test_hsm_gold_is_the_problem_value(generated):
    for r in records(generated["hsm"]):
        assert eval(r["expression"]) == r["answer"] and r["answer"] >= 0  # digits and + - * / only
        assert set(re.findall(r"\d+", r["expression"])) <= set(re.findall(r"\d+", r["prompt"]))
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", r["response"]):
            assert eval(f"{a} {op} {b}") == int(c)
        assert r["response"].endswith(f"The answer is {r['answer']}.")
        assert numeric_accuracy(r["response"], r) == 1.0


def test_records_are_json_lines_with_ids(generated):
    lines = generated["boolq"]["dev"].read_text().splitlines()
    assert [json.loads(s)["id"] for s in lines] == [f"boolq-dev-{i}" for i in range(10)]


def test_formats_kinds_are_shown_only_by_exemplars(tmp_path):
    """PILLOW's test bed: every prompt has the same shape ("x, y"), the kind decides the response's format,
    and the metric is exact on the first line (format, case and punctuation count)."""
    from train.tasks import EXTRA_TASKS, task
    from train.tasks.formats import KINDS, first_line_exact

    fmt = task("formats")
    assert fmt is EXTRA_TASKS["formats"] and "formats" not in TASKS  # not one of the suite's five
    paths = fmt.generate(tmp_path, seed=0, n_train=300, n_dev=20, n_test=20)
    recs = records(paths)
    assert recs == records(fmt.generate(tmp_path / "again", seed=0, n_train=300, n_dev=20, n_test=20))
    assert {r["kind"] for r in recs} == set(KINDS)
    for r in recs:
        a, b = r["prompt"].split(", ")
        assert a != b and all(x in KINDS[r["kind"]][0] for x in (a, b))
    by_kind = {r["kind"]: r for r in recs}
    assert by_kind["colors"]["response"] == by_kind["colors"]["prompt"].upper().replace(", ", "/")
    assert by_kind["animals"]["response"] == by_kind["animals"]["prompt"].replace(", ", " + ")
    r = by_kind["cities"]
    assert first_line_exact(f"  {r['response']}\nmore text", r) == 1.0
    assert first_line_exact(r["response"].lower() + "!", r) == 0.0 or r["response"].lower() + "!" == r["response"]
    assert first_line_exact(r["prompt"], r) == 0.0  # the items without the format score nothing
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        task("nope")
