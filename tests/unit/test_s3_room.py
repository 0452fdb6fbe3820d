"""The S3 server refuses to start where it could not write: SeaweedFS derives its volume count from free disk, and
without room it fails every upload later with a bare InternalError."""

from __future__ import annotations

import re
import shutil

import pytest

from cogumi_tasks.stack.services import ServiceError, start_s3


def test_start_s3_without_room_names_the_folder_and_the_figures(tmp_path):
    more_than_the_disk = 2 * shutil.disk_usage(tmp_path).total / 2**30  # other tests write and delete meanwhile
    with pytest.raises(ServiceError) as err:
        start_s3(tmp_path / "s3", 1, "a", "b", tmp_path / "logs" / "s3.log", min_free_gib=more_than_the_disk)
    msg = str(err.value)
    assert str(tmp_path / "s3") in msg and "1% of the disk" in msg
    wanted = r"[0-9.]+ GiB free, [0-9.]+ GiB needed \(" + re.escape(f"{more_than_the_disk:g} GiB to write")
    assert re.search(wanted, msg), msg
    assert not (tmp_path / "logs").exists()  # refused before anything started (port 1 is not even checked)
