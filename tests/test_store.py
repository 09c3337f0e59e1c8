import sqlite3

import pytest

from hetpure_bench.bench.store import ResultStore, StoredExamples, setup_hash
from hetpure_bench.errors import UserError


def _records(start, n, correct=True):
    return {mode: [{"index": start + i, "robust_correct": correct, "mode": mode} for i in range(n)]
            for mode in ("single", "worst:2")}


def test_batches_round_trip_in_run_order_and_survive_reopening(tmp_path):
    path = tmp_path / "sub" / "results.sqlite"
    with ResultStore(path) as store:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        store.register("k", {"defense": "hetpure"})
        store.commit_batch("k", 4, _records(4, 2, False), {"attack_s": 1.0})
        store.commit_batch("k", 0, _records(0, 4), {"attack_s": 2.0})
        store.commit_batch("k", 0, _records(0, 4), {"attack_s": 2.0})  # recommitting replaces, never duplicates
    with ResultStore(path) as store:
        assert store.done_batches("k") == {0, 4} and store.done_batches("other") == set()
        frame = store.per_image("k", "worst:2")
        assert frame["index"].tolist() == [0, 1, 2, 3, 4, 5] and frame["robust_correct"].sum() == 4
        assert [c["attack_s"] for c in store.batch_costs("k")] == [2.0, 1.0]
        assert store.setup("k") == {"defense": "hetpure"} and store.setup("nope") is None
        assert [batch[0] for batch in store.batches("k")] == [0, 4]
    assert not (tmp_path / "sub" / "results.sqlite-wal").exists() or (tmp_path / "sub" / "results.sqlite-wal").stat().st_size == 0


def test_a_failing_batch_commits_nothing(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    bad = _records(0, 3)
    bad["worst:2"][2]["oops"] = object()  # not JSON: fails after the first rows were inserted
    with pytest.raises(TypeError):
        store.commit_batch("k", 0, bad, {}, "attack", [b"examples"])
    assert store.done_batches("k") == set() and store.per_image("k", "single").empty
    with pytest.raises(sqlite3.ProgrammingError):  # fails after the records: none of them stays
        store.commit_batch("k", 0, _records(0, 3), {}, "attack", [object()])
    assert store.done_batches("k") == set() and store.per_image("k", "single").empty
    assert store.stored_examples("attack") == {}
    store.close()


def test_adversarial_examples_are_committed_with_their_batch_and_found_by_attack_key(tmp_path):
    path = tmp_path / "r.sqlite"
    with ResultStore(path) as store:
        store.commit_batch("a", 0, _records(0, 2), {"attack_s": 3.0}, "attack-1", [b"pgd", b"apgd"])
        store.commit_batch("a", 2, _records(2, 2), {"attack_s": 4.0}, "attack-1", [b"pgd2", b"apgd2"])
        # Another evaluation of the same attack, judged from those examples: it stores none, and
        # examples stored again under the key keep the first ones.
        store.commit_batch("b", 0, _records(0, 2), {"attack_s": 3.0, "attack_reused_from": "a"}, "attack-1", [])
        store.commit_batch("c", 2, _records(2, 2), {"attack_s": 9.0}, "attack-1", [b"other", b"other"])
        with pytest.raises(ValueError, match="attack key"):
            store.commit_batch("d", 0, _records(0, 2), {}, None, [b"x"])
    with ResultStore(path) as store:
        found = store.stored_examples("attack-1")
        assert sorted(found) == [0, 2] and store.stored_examples("attack-2") == {}
        assert found[0] == StoredExamples("a", 3.0, [b"pgd", b"apgd"])
        assert found[2] == StoredExamples("a", 4.0, [b"pgd2", b"apgd2"])
        assert [batch[3:] for batch in store.batches("a")] == [("attack-1", [b"pgd", b"apgd"], {}), ("attack-1", [b"pgd2", b"apgd2"], {})]
        assert [batch[3:] for batch in store.batches("b")] == [(None, [], {})]
        store.forget("a")
        assert store.stored_examples("attack-1") == {}


def test_rows_sanity_and_forgetting_a_setup(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.register("a", {}), store.register("b", {})
    store.commit_batch("a", 0, _records(0, 1), {})
    store.save_sanity("a", {"single": [{"name": "eps-zero", "passed": True, "detail": ""}]}, 1.5)
    store.save_rows("a", {"single": {"defense": "x"}}), store.save_rows("b", {"single": {"defense": "y"}})
    assert store.sanity("a") == ({"single": [{"name": "eps-zero", "passed": True, "detail": ""}]}, 1.5)
    assert [(r["defense"], r["setup_hash"]) for r in store.rows()] == [("x", "a"), ("y", "b")]
    store.forget("a")
    assert store.sanity("a") is None and store.done_batches("a") == set() and not store.is_empty()
    store.forget("b")
    assert store.is_empty()
    store.delete()
    assert not (tmp_path / "r.sqlite").exists()


def test_setup_hash_is_canonical():
    assert setup_hash({"a": 1, "b": [1, 2]}) == setup_hash({"b": [1, 2], "a": 1})
    assert setup_hash({"a": 1}) != setup_hash({"a": 2})


def test_a_file_that_is_not_a_store_is_one_line(tmp_path):
    path = tmp_path / "results.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="cannot open the result store"):
        ResultStore(path)
    assert path.read_bytes() == b"this is not a database" * 100


def test_another_process_sees_a_committed_batch_at_once(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.commit_batch("k", 0, _records(0, 2), {})
    reader = sqlite3.connect(tmp_path / "r.sqlite")  # as a concurrent reader would
    assert reader.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 1
    reader.close()
    store.close()
