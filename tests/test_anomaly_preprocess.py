"""Preprocessing of HDFS logs: masking on real raw lines, session grouping, template rendering, bad input."""

import re

import pytest

from lowres.anomaly.preprocess import (SEP, SessionError, data_file, group_sessions, join_session, mask,
                                       message_of, read_id_sessions, read_labeled_sessions, read_templates,
                                       render_ids)

LINES = data_file("HDFS_1k.log").read_text().splitlines()


def test_masking_leaves_no_digit_runs_ips_or_block_ids():
    for line in LINES:
        m = message_of(line)
        assert not re.search(r"\d{2,}", m), m
        assert not re.search(r"\d+\.\d+\.\d+\.\d+", m), m
        assert "blk_" not in m and "/" not in m, m


def test_masking_keeps_templates_intact():
    msgs = {message_of(line) for line in LINES}
    # a dozen distinct masked messages (the header and every variable gone), each a known template's words
    assert 8 <= len(msgs) <= 20
    assert "PacketResponder <*> for block <*> terminating" in msgs
    assert "Receiving block <*> src: <*> dest: <*>" in msgs
    assert mask("to /10.251.73.220:50010 at http://x.org/a?b=1 in /mnt/hadoop/dfs/data size 67108864") == \
        "to <*> at <*> in <*> size <*>"


def test_grouping_by_block_id():
    sessions = group_sessions(LINES)
    assert len(sessions) > 500
    ids = [re.findall(r"blk_-?\d+", line)[0] for line in LINES]
    key = ids[0]
    assert len(sessions[key]) == sum(1 for line in LINES if key in line)
    assert SEP in join_session(["a", "b"]) and join_session(["a", "b"]) == "a ;-; b"


def test_bad_input_says_counts():
    with pytest.raises(SessionError, match=r"found 0 sessions in 2 non-empty lines \(2 match no session key"):
        group_sessions(["081109 203615 148 INFO no block here", "another line"])
    with pytest.raises(SessionError, match="need at least 5"):
        group_sessions(LINES[:1], min_sessions=5)
    with pytest.raises(SessionError, match="0 messages found, at least 1 needed"):
        join_session(["", "  "])


def test_template_sessions_render_and_read():
    templates = read_templates()
    assert len(templates) == 30 and "<*>" not in templates["E2"].split()[0]
    rows = read_labeled_sessions()
    assert len(rows) == 12000 and {y for _, y in rows} == {0, 1}
    text = render_ids(read_id_sessions()[0], templates)
    assert text.startswith("Receiving block <*> src: <*> dest:") and SEP in text
    with pytest.raises(SessionError, match="unknown event ids"):
        render_ids(["E99"], templates)
