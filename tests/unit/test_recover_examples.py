"""Recovery keeps the answers a task checker verified and sends only the others to the teacher."""

from cogumi_tasks.compress.recover import split_verified


def test_verified_rows_keep_their_answer_and_the_rest_go_to_the_teacher():
    rows = [{"prompt": "Write f", "response": "def f(): ...", "teacher": "teacher-b",
             "task": {"family": "list_fn", "params": {}}},
            {"prompt": "Tell me about tea", "response": "Tea is a drink.", "teacher": "teacher-a"},
            {"prompt": "What is 2+3?", "response": "Answer: 5", "teacher": "teacher-b",
             "task": {"family": "word_arith"}}]
    verified, to_improve = split_verified(rows)
    assert [r["response"] for r in verified] == ["def f(): ...", "Answer: 5"]
    assert all(r["verified"] and r["original"] == r["response"] for r in verified)
    assert [r["prompt"] for r in to_improve] == ["Tell me about tea"]
    assert split_verified([]) == ([], [])
