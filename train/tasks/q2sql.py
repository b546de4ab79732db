"""Q2SQL-like: natural-language questions → SQL over a generated sqlite database (execution accuracy).

`generate` first writes `q2sql.sqlite` (tables `people` and `pets`, contents drawn from the seed) into the
output directory; every record names it (`record["db"]`, an absolute path) with the gold query. A question is
kept only when its gold query returns a non-empty result (and, for ORDER BY queries, an unambiguous order).

Scoring runs the predicted and the gold query on that database through a read-only connection
(`mode=ro`, an authorizer that allows reads only, one statement, a VM-step budget): a prediction that fails
for any reason scores 0. Results compare as ordered lists when the gold query has ORDER BY, else as
multisets of rows; numbers compare by value (3 == 3.0, floats to 6 decimals), column names are ignored.
"""

from __future__ import annotations

import functools
import random
import re
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

from train.tasks.base import Record, Sampler, Task
from train.tasks.words import ANIMALS, CITIES, JOBS, NAMES, PET_NAMES

DB_NAME = "q2sql.sqlite"
SCHEMA = "Tables: people(id, name, age, city, job, salary), pets(id, owner_id, name, species)."
MAX_VM_STEPS = 2_000_000  # sqlite VM instructions one query may take (cross-join bombs stop here)

# authorizer actions a read-only query needs (33 = SQLITE_RECURSIVE, a WITH RECURSIVE clause)
_RECURSIVE = getattr(sqlite3, "SQLITE_RECURSIVE", 33)
_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, _RECURSIVE}
_JOIN = "FROM pets JOIN people ON pets.owner_id = people.id"


def _authorize(action: int, *_: Any) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


def run_query(db: str | Path, sql: str) -> list[tuple]:
    """Rows of `sql` on the database file `db`, opened read-only; raises on any failure or write attempt."""
    path = Path(db)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such database (generate the q2sql task again)")
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        con.set_authorizer(_authorize)
        steps = [0]

        def budget() -> int:
            steps[0] += 1
            return int(steps[0] * 1000 > MAX_VM_STEPS)  # non-zero aborts the query

        con.set_progress_handler(budget, 1000)
        return con.execute(sql).fetchall()
    finally:
        con.close()


@functools.lru_cache(maxsize=4096)
def _gold_rows(db: str, sql: str) -> tuple[tuple, ...]:
    return tuple(run_query(db, sql))


def _value(v: Any) -> Any:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return round(float(v), 6)
    return v


def same_result(pred: list[tuple], gold: list[tuple], ordered: bool) -> bool:
    """Equal as ordered lists (`ordered`) or as multisets of rows, numbers by value."""
    p = [tuple(_value(v) for v in row) for row in pred]
    g = [tuple(_value(v) for v in row) for row in gold]
    return p == g if ordered else Counter(p) == Counter(g)


def clean_sql(prediction: str) -> str:
    """The query in a prediction: code fences and a trailing semicolon removed."""
    text = prediction.strip()
    fenced = re.search(r"```(?:sql)?\s*(.*?)(?:```|$)", text, re.S | re.I)
    if fenced:
        text = fenced.group(1).strip()
    return text.rstrip().rstrip(";").strip()


def execution_accuracy(prediction: str, record: Record) -> float:
    """1.0 when the predicted query returns the gold query's result on `record["db"]`; 0.0 when it differs
    or fails (syntax error, unknown column, a write or any other statement the read-only guard refuses)."""
    db, gold = str(record["db"]), record.get("sql", record["response"])
    gold_rows = list(_gold_rows(db, gold))  # a missing database raises: that is a setup error, not a 0
    try:
        pred_rows = run_query(db, clean_sql(prediction))
    except Exception:  # sqlite3.Error, sqlite3.Warning (several statements), ValueError (NUL), ...
        return 0.0
    ordered = re.search(r"\border\s+by\b", gold, re.I) is not None
    return float(same_result(pred_rows, gold_rows, ordered))


def build_database(path: Path, rng: random.Random) -> None:
    """A fresh `people` / `pets` database drawn from `rng` (replaces `path`)."""
    path.unlink(missing_ok=True)
    cities, jobs = rng.sample(CITIES, 10), rng.sample(JOBS, 12)
    salaries = rng.sample(range(200, 1500), len(NAMES))
    people = [
        (i + 1, name, rng.randint(18, 75), rng.choice(cities), rng.choice(jobs), salaries[i] * 100)
        for i, name in enumerate(rng.sample(NAMES, len(NAMES)))
    ]
    pets = [(i + 1, rng.randint(1, len(people)), rng.choice(PET_NAMES), rng.choice(ANIMALS)) for i in range(90)]
    con = sqlite3.connect(path)
    try:
        con.execute(
            "CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, city TEXT, job TEXT, salary INTEGER)"
        )
        con.execute("CREATE TABLE pets (id INTEGER PRIMARY KEY, owner_id INTEGER, name TEXT, species TEXT)")
        con.executemany("INSERT INTO people VALUES (?, ?, ?, ?, ?, ?)", people)
        con.executemany("INSERT INTO pets VALUES (?, ?, ?, ?)", pets)
        con.commit()
    finally:
        con.close()


def _question(rng: random.Random, v: dict[str, list]) -> tuple[str, str]:
    """One (question, gold SQL) from a random template; `v` holds the values present in the database."""
    city, job, name, species = (rng.choice(v[k]) for k in ("city", "job", "name", "species"))
    n, k = rng.randint(20, 70), rng.randint(2, 8)
    more, cmp = rng.choice((("older", ">"), ("younger", "<")))
    templates = (
        (f"List the names of people who live in {city}.", f"SELECT name FROM people WHERE city = '{city}'"),
        (f"How many people work as a {job}?", f"SELECT COUNT(*) FROM people WHERE job = '{job}'"),
        (f"What is the average age of people in {city}?", f"SELECT AVG(age) FROM people WHERE city = '{city}'"),
        (f"Which people are {more} than {n}?", f"SELECT name FROM people WHERE age {cmp} {n}"),
        (
            f"How many people in {city} are {more} than {n}?",
            f"SELECT COUNT(*) FROM people WHERE city = '{city}' AND age {cmp} {n}",
        ),
        (
            f"Which people in {city} are {more} than {n}?",
            f"SELECT name FROM people WHERE city = '{city}' AND age {cmp} {n}",
        ),
        (
            f"How many people in {city} work as a {job}?",
            f"SELECT COUNT(*) FROM people WHERE city = '{city}' AND job = '{job}'",
        ),
        (f"Who is the oldest {job}?", f"SELECT name FROM people WHERE job = '{job}' ORDER BY age DESC LIMIT 1"),
        (f"Who is the youngest {job}?", f"SELECT name FROM people WHERE job = '{job}' ORDER BY age ASC LIMIT 1"),
        (f"What is the highest salary of a {job}?", f"SELECT MAX(salary) FROM people WHERE job = '{job}'"),
        (f"What is the total salary of people in {city}?", f"SELECT SUM(salary) FROM people WHERE city = '{city}'"),
        (
            f"Which cities have more than {k} people?",
            f"SELECT city FROM people GROUP BY city HAVING COUNT(*) > {k}",
        ),
        (f"Where does {name} live?", f"SELECT city FROM people WHERE name = '{name}'"),
        (f"How many pets does {name} have?", f"SELECT COUNT(*) {_JOIN} WHERE people.name = '{name}'"),
        (
            f"What are the names of the pets of type {species} owned by people in {city}?",
            f"SELECT pets.name {_JOIN} WHERE pets.species = '{species}' AND people.city = '{city}'",
        ),
        (
            f"How many pets of type {species} do people in {city} have?",
            f"SELECT COUNT(*) {_JOIN} WHERE pets.species = '{species}' AND people.city = '{city}'",
        ),
    )
    return rng.choice(templates)


def _unambiguous(db: str, sql: str) -> bool:
    """An ORDER BY ... LIMIT 1 query whose first two rows tie on the sort key has no single right answer."""
    m = re.search(r"ORDER BY (\w+)", sql)
    if m is None:
        return True
    key = m.group(1)
    probe = re.sub(r"SELECT \w+ ", f"SELECT {key} ", sql).replace("LIMIT 1", "LIMIT 2")
    rows = run_query(db, probe)
    return len(rows) < 2 or rows[0] != rows[1]


class Q2SQL(Task):
    name = "q2sql"
    description = "NL to SQL over a generated sqlite schema (execution accuracy)"
    metric = staticmethod(execution_accuracy)

    def sampler(self, rng: random.Random, out_dir: Path) -> Sampler:
        path = out_dir / DB_NAME
        build_database(path, rng)
        db = str(path.resolve())
        _gold_rows.cache_clear()  # the file was just replaced
        con = sqlite3.connect(path)
        try:
            values = {
                "city": [r[0] for r in con.execute("SELECT DISTINCT city FROM people ORDER BY city")],
                "job": [r[0] for r in con.execute("SELECT DISTINCT job FROM people ORDER BY job")],
                "name": [r[0] for r in con.execute("SELECT name FROM people ORDER BY id")],
                "species": [r[0] for r in con.execute("SELECT DISTINCT species FROM pets ORDER BY species")],
            }
        finally:
            con.close()

        def sample(rng: random.Random) -> Record | None:
            question, sql = _question(rng, values)
            rows = run_query(db, sql)
            if not rows or all(v is None for row in rows for v in row) or not _unambiguous(db, sql):
                return None
            prompt = f"{SCHEMA}\nQuestion: {question}\nSQL:"
            return {"prompt": prompt, "response": sql, "sql": sql, "db": db}

        return sample
