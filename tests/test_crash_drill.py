"""kill -9 at >= 20 random moments of training (many inside checkpoint writes), span-index builds and
kNN-store builds: nothing saved is lost, resume works, queries answer right or fail cleanly, no
temporary files remain. The drill itself is `python -m benchmarks.crash_drill` (it prints every count)."""

from __future__ import annotations

import pytest

from benchmarks import crash_drill as drill


@pytest.mark.slow
def test_crash_drill(tmp_path):
    total = drill.run(train=14, spans=4, knn=4, seed=0, root=tmp_path)["total"]
    assert total.kills >= 20, total.notes
    assert (total.corrupt, total.failed_resumes, total.wrong_answers, total.leftovers) == (0, 0, 0, 0), total.notes
