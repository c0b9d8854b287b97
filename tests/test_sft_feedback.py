"""train_sft.py's feedback store (SQLite) and `rate` subcommand, in-process: the CLI goes through
common.run_main exactly as the script does (a subprocess per call would cost 2 s of torch import)."""
import multiprocessing
import sqlite3
import time
from pathlib import Path

import pytest

import common
import train_sft
from conftest import run

SEED_COLUMNS = ["id", "timestamp", "user_input", "ai_response", "user_feedback", "context", "success"]


def rate(capsys, *argv):
    """`train_sft.py rate ARGV` through run_main: (exit code, stdout, stderr)."""
    try:
        common.run_main(lambda: train_sft.run_rate([str(a) for a in argv]))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def raw(db, sql, *params):
    """Write with plain sqlite3, as the seed or a hand edit would (no validation of ours)."""
    con = sqlite3.connect(db)
    with con:
        cur = con.execute(sql, params)
    con.close()
    return cur.lastrowid


def test_schema_is_the_seeds_and_wal(tmp_path):
    db = tmp_path / "sub" / "fb.db"  # the parent folder is made too
    train_sft.open_feedback_db(db).close()
    con = sqlite3.connect(db)
    cols = con.execute("PRAGMA table_info(user_interactions)").fetchall()
    assert [c[1] for c in cols] == SEED_COLUMNS
    assert [c[2] for c in cols] == ["INTEGER", "TEXT", "TEXT", "TEXT", "INTEGER", "TEXT", "INTEGER"]
    assert [c[1] for c in con.execute("PRAGMA table_info(training_use)")] == \
        ["interaction_id", "round", "run", "kept", "used_at"]
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_seed_database_opens_and_bad_ones_do_not(tmp_path):
    # a database made by the seed: its table only, rollback journal; it gains WAL and training_use
    seed = tmp_path / "seed.db"
    raw(seed, "CREATE TABLE user_interactions (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp TEXT, "
              "user_input TEXT, ai_response TEXT, user_feedback INTEGER, context TEXT, success INTEGER)")
    raw(seed, "INSERT INTO user_interactions (timestamp, user_input, ai_response, user_feedback, context, success) "
              "VALUES ('2024-01-01', 'list files', 'ls', 1, NULL, 1)")
    assert [r["id"] for r in train_sft.new_training_rows(seed, set(), print)] == [1]
    # a database without the seed's columns, or without the table
    other = tmp_path / "other.db"
    raw(other, "CREATE TABLE user_interactions (id INTEGER PRIMARY KEY, question TEXT)")
    with pytest.raises(common.UserError, match=r"--feedback-db .*lacks column\(s\) timestamp, user_input"):
        train_sft.open_feedback_db(other)
    empty = tmp_path / "empty.db"
    raw(empty, "CREATE TABLE t (x)")
    with pytest.raises(common.UserError, match="--feedback-db .*has no user_interactions table"):
        train_sft.open_feedback_db(empty, create=False)
    with pytest.raises(common.UserError, match="--feedback-db .*no such database; `ask --feedback-db"):
        train_sft.open_feedback_db(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_rated_good_rows_are_returned_once(tmp_path):
    db = tmp_path / "fb.db"
    log = lambda *a: pytest.fail(f"unexpected warning {a}")
    good = train_sft.log_interaction(db, "list files", "ls -la", context={"cwd": "/tmp", "os": "linux"})
    bad = train_sft.log_interaction(db, "delete all", "rm -rf /")
    neutral = train_sft.log_interaction(db, "show date", "date")
    failed = train_sft.log_interaction(db, "count lines", "wc -l *")
    unrated = train_sft.log_interaction(db, "free disk", "df -h")
    assert train_sft.new_training_rows(db, set(), log) == []  # nothing rated yet
    train_sft.rate_interaction(db, good, 1, success=True)
    train_sft.rate_interaction(db, bad, -1, success=False)
    train_sft.rate_interaction(db, neutral, 0, success=True)
    train_sft.rate_interaction(db, failed, 2, success=False)
    rows = train_sft.new_training_rows(db, set(), log)
    assert rows == [{"id": good, "input": "list files", "output": "ls -la",
                     "context": {"cwd": "/tmp", "os": "linux"}}]
    # success None leaves it as it was; a score above 1 counts as good
    train_sft.rate_interaction(db, unrated, 3)
    assert [r["id"] for r in train_sft.new_training_rows(db, set(), log)] == [good]
    train_sft.rate_interaction(db, unrated, 3, success=True)
    assert [r["id"] for r in train_sft.new_training_rows(db, set(), log)] == [good, unrated]

    train_sft.mark_used(db, [good, unrated], round_no=1, run="runs/a", kept=True)
    assert train_sft.new_training_rows(db, set(), log) == []
    # a second batch: only the new rows, oldest first
    later = [train_sft.log_interaction(db, f"request {i}", f"echo {i}", success=True, feedback=1) for i in range(3)]
    assert [r["id"] for r in train_sft.new_training_rows(db, set(), log)] == later
    train_sft.mark_used(db, later, round_no=2, run="runs/b", kept=False)
    train_sft.mark_used(db, later[:1], round_no=3, run="runs/b", kept=False)  # repeated: keeps round 2
    assert train_sft.new_training_rows(db, set(), log) == []
    assert train_sft.used_rows(db) == {good: 1, unrated: 1, later[0]: 2, later[1]: 2, later[2]: 2}
    assert train_sft.used_rows(db, run="runs/a") == {good: 1, unrated: 1}
    con = sqlite3.connect(db)
    assert con.execute("SELECT kept FROM training_use ORDER BY interaction_id").fetchall() == \
        [(1,), (1,), (0,), (0,), (0,)]
    ts = con.execute("SELECT timestamp FROM user_interactions WHERE id = ?", (good,)).fetchone()[0]
    con.close()
    assert ts.endswith("+00:00") and "T" in ts  # ISO-8601 UTC
    with pytest.raises(common.UserError, match="no interaction 999"):
        train_sft.rate_interaction(db, 999, 1)


def test_bad_rows_are_skipped_with_one_warning_each(tmp_path):
    db = tmp_path / "fb.db"
    first = train_sft.log_interaction(db, "list files", "ls", success=True, feedback=1)
    cols = "INSERT INTO user_interactions (user_input, ai_response, user_feedback, context, success) VALUES "
    bad = {
        raw(db, cols + "('say hi', '   ', 1, NULL, 1)"): "empty ai_response",
        raw(db, cols + "(NULL, 'echo hi', 1, NULL, 1)"): "user_input is NULL",
        raw(db, cols + "('say hi', 'echo hi', 1, '{not json', 1)"): "context is not valid JSON",
        raw(db, cols + "('say hi', 'echo hi', 'great', NULL, 1)"): "user_feedback 'great' is not an integer",
        raw(db, cols + "('say hi', 'echo hi', 1.5, NULL, 1)"): "user_feedback 1.5 is not an integer",
    }
    last = train_sft.log_interaction(db, "show date", "date", success=True, feedback=1)
    warned, lines = set(), []
    for _ in range(2):  # the watcher polls again: no new warnings
        rows = train_sft.new_training_rows(db, warned, lines.append)
        assert [r["id"] for r in rows] == [first, last]
    assert lines == [f"feedback-db: interaction {i} skipped: {why}" for i, why in bad.items()]
    assert warned == set(bad)
    train_sft.mark_used(db, [first, last], 1, "runs/a", True)
    assert train_sft.new_training_rows(db, warned, lines.append) == [] and len(lines) == len(bad)
    assert set(train_sft.used_rows(db)) == {first, last}  # bad rows are never recorded as used


def _writer(db, n):
    for i in range(n):  # one transaction each, as `ask` does per answer
        train_sft.log_interaction(db, f"request {i}", f"echo {i}", context={"i": i}, success=True, feedback=1)


def test_concurrent_writer_never_sees_a_locked_database(tmp_path):
    db = tmp_path / "fb.db"
    train_sft.open_feedback_db(db).close()  # as `ask` or the watcher would at start
    # fork: the child already has train_lm imported (spawn would pay 2 s of torch import)
    writer = multiprocessing.get_context("fork").Process(target=_writer, args=(str(db), 200))
    writer.start()
    seen, polls, rounds = [], 0, 0
    while writer.is_alive():
        rows = train_sft.new_training_rows(db, set(), print)
        polls += 1
        if rows:  # the reader writes too, as the watcher does after each round
            rounds += 1
            train_sft.mark_used(db, [r["id"] for r in rows], rounds, "runs/c", True)
            seen += [r["id"] for r in rows]
    writer.join(30)
    assert writer.exitcode == 0  # a "database is locked" in the writer would have made it 1
    rows = train_sft.new_training_rows(db, set(), print)
    seen += [r["id"] for r in rows]
    assert sorted(seen) == list(range(1, 201)) and len(set(seen)) == 200
    assert polls > 1 and rounds > 1, (polls, rounds)  # the reader and the writer really overlapped


def test_rate_cli(tmp_path, capsys):
    db = tmp_path / "fb.db"
    ids = [train_sft.log_interaction(db, f"list files {i}", f"ls -{i}\nsecond line") for i in range(4)]
    code, out, err = rate(capsys, "--feedback-db", db, ids[0], "good")
    assert (code, err) == (0, "")
    assert out == f"interaction {ids[0]}: feedback 1, success 1 -- the next --continuous-learning round will train on it\n"
    code, out, _ = rate(capsys, "--feedback-db", db, ids[1], "bad")
    assert code == 0 and out.startswith(f"interaction {ids[1]}: feedback -1, success 0 -- not trained on")
    code, out, _ = rate(capsys, "--feedback-db", db, ids[2], "2")
    assert code == 0 and out.startswith(f"interaction {ids[2]}: feedback 2, success unset -- not trained on until")
    code, out, _ = rate(capsys, "--feedback-db", db, ids[3], "good", "--failed")
    assert code == 0 and out.startswith(f"interaction {ids[3]}: feedback 1, success 0")
    code, out, _ = rate(capsys, "--feedback-db", db, ids[2], "-3", "--success")
    assert code == 0 and out.startswith(f"interaction {ids[2]}: feedback -3, success 1")
    con = sqlite3.connect(db)
    assert con.execute("SELECT user_feedback, success FROM user_interactions ORDER BY id").fetchall() == \
        [(1, 1), (-1, 0), (-3, 1), (1, 0)]
    con.close()
    assert [r["id"] for r in train_sft.new_training_rows(db, set(), print)] == [ids[0]]
    train_sft.mark_used(db, [ids[0]], 4, "runs/a", True)

    code, out, _ = rate(capsys, "--feedback-db", db, "--list", "3")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4 and lines[0].split()[:2] == ["id", "time"]
    assert [l.split()[0] for l in lines[1:]] == [str(i) for i in ids[1:]]  # the last 3, oldest first
    assert "list files 1 -> ls -1\\nsecond line" in lines[1] and " new " in lines[1]
    code, out, _ = rate(capsys, "--feedback-db", db, "--list")
    assert code == 0 and "round 4" in out.splitlines()[1]
    code, out, _ = rate(capsys, "--feedback-db", db, ids[0], "bad")
    assert code == 0 and "already trained on in round 4" in out


@pytest.mark.parametrize("argv, message", [
    (["999", "good"], "--feedback-db {db}: no interaction 999; `train_sft.py rate --feedback-db {db} --list`"),
    (["1", "meh"], "argument {{good,bad,SCORE}}: must be good, bad or an integer score, got 'meh'"),
    (["1", "1.5"], "must be good, bad or an integer score, got '1.5'"),
    (["1"], "give ID and RATING"),
    (["0", "good"], "argument ID: must be a positive integer"),
    (["1", "good", "--success", "--failed"], "not allowed with argument"),
    (["1", "good", "--list"], "--list takes no ID"),
])
def test_rate_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    db = tmp_path / "fb.db"
    train_sft.log_interaction(db, "list files", "ls")
    code, out, err = rate(capsys, "--feedback-db", db, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ")
    assert message.format(db=db) in err


def test_rate_cli_missing_or_foreign_file(tmp_path, capsys):
    missing = tmp_path / "none" / "fb.db"
    code, _, err = rate(capsys, "--feedback-db", missing, "1", "good")
    assert code == 2 and err == f"error: --feedback-db {missing}: no such database; `ask --feedback-db {missing}` creates it\n"
    assert not missing.parent.exists()  # rate never creates one
    code, _, err = rate(capsys, "--feedback-db", missing, "--list")
    assert code == 2 and "no such database" in err
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not a database\n" * 100)
    before = text.stat()
    for argv in (["1", "good"], ["--list"]):
        code, _, err = rate(capsys, "--feedback-db", text, *argv)
        assert code == 2 and err == f"error: --feedback-db {text}: not a SQLite database; give another file name\n"
    with pytest.raises(common.UserError, match="not a SQLite database"):  # nor does `ask` overwrite it
        train_sft.log_interaction(text, "a", "b")
    after = text.stat()
    assert text.read_bytes() == b"not a database\n" * 100
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no -wal / -shm beside it


def test_rate_through_the_real_script(tmp_path):
    db = tmp_path / "fb.db"
    i = train_sft.log_interaction(db, "list files", "ls")
    p = run("train_sft.py", "rate", "--feedback-db", db, i, "good", cwd=tmp_path, check=0)
    assert p.stdout.startswith(f"interaction {i}: feedback 1, success 1")
    p = run("train_sft.py", "rate", "--feedback-db", db, 999, "good", cwd=tmp_path, check=2)
    assert p.stderr.startswith("error: --feedback-db") and p.stderr.count("\n") == 1


def _first_opener(db, n, barrier):
    """One of several processes that open a fresh database at the same moment and insert n rows;
    any error (a UserError "database is locked") ends it with exit code 1."""
    barrier.wait()
    for i in range(n):
        train_sft.log_interaction(db, f"request {i}", f"echo {i}")


def _racing_reader(db, barrier):
    """`rate --list` or the watcher starting while `ask` is still creating the database."""
    barrier.wait()
    while not Path(db).exists():
        time.sleep(0.001)
    assert train_sft.used_rows(db) == {} and train_sft.new_training_rows(db, set(), print) == []


def test_concurrent_first_opens_lose_nothing(tmp_path):
    # the audit: "database is locked" from PRAGMA journal_mode=WAL on concurrent first opens, an
    # insert lost, and readers racing the creator told "has no user_interactions table"
    ctx = multiprocessing.get_context("fork")  # as above: no second torch import
    n, m = 6, 20
    for r in range(3):
        db = str(tmp_path / f"fb{r}.db")
        barrier = ctx.Barrier(n + 2)
        procs = [ctx.Process(target=_first_opener, args=(db, m, barrier)) for _ in range(n)]
        procs += [ctx.Process(target=_racing_reader, args=(db, barrier)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * len(procs)  # a child's error is in the captured stderr
        con = sqlite3.connect(db)
        assert con.execute("SELECT COUNT(*) FROM user_interactions").fetchone()[0] == n * m
        con.close()
