"""Reading a 1 GB JSONL artifact record by record holds one record at a time, not the file.

The child's peak RSS is its own address space's high-water mark (VmHWM), not ``ru_maxrss``: Linux carries
the parent's peak into ``ru_maxrss`` across fork/vfork and exec, so a large pytest process would be measured.
"""

from __future__ import annotations

import json
import subprocess
import sys

GIB = 1024**3
MAX_RSS_MB = 300

CHILD = """
import json, sys
from pathlib import Path
from cogumi_tasks.core.records import iter_jsonl_dicts

rows = chars = 0
for row in iter_jsonl_dicts(Path(sys.argv[1])):
    rows += 1
    chars += len(row["response"])
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(json.dumps({"rows": rows, "chars": chars, "maxrss_kb": hwm}))
"""


def test_reading_a_1gb_jsonl_file_stays_under_300mb_rss(tmp_path):
    path = tmp_path / "big.jsonl"
    row = {"id": "r", "prompt": "What is the capital of France? " * 4, "response": "Paris is the capital. " * 40}
    line = (json.dumps(row) + "\n").encode()
    per_block = 8 * 1024 * 1024 // len(line)
    block = line * per_block
    blocks = -(-GIB // len(block))
    try:
        with open(path, "wb") as f:
            for _ in range(blocks):
                f.write(block)
        assert path.stat().st_size >= GIB
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
    finally:
        path.unlink(missing_ok=True)
    assert got["rows"] == blocks * per_block and got["chars"] == got["rows"] * len(row["response"])
    assert got["maxrss_kb"] / 1024 < MAX_RSS_MB, f"peak RSS {got['maxrss_kb'] / 1024:.0f} MB reading 1 GB"
