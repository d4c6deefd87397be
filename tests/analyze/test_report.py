"""The analysis report's warning about windows that discard distant content (not an attention sink)."""

from hybridize.analyze.report import distant_content_warning


def row(layer, choice, outside, first):
    record = {"layer": layer, "choice": choice, "proxies": {"outside_window": outside}}
    return record if first is None else record | {"first_token": first}


def test_only_planned_windows_that_lose_content_are_named():
    layers = [
        row(0, "sliding_attention", 0.50, 0.05),  # 0.45 of distant content: named
        row(1, "sliding_attention", 0.60, 0.58),  # almost all of it a sink: not named
        row(2, "full_attention", 0.50, 0.00),  # kept as attention: loses nothing
        row(3, "gated_deltanet", 0.50, 0.00),  # a recurrent state, not a window
        row(4, "sliding_attention", 0.50, None),  # a plan written before first_token was measured
        row(5, "sliding_attention", None, None),  # blocks no longer than the window
        row(6, "sliding_attention", 0.25, 0.04),  # 0.21: just over the line
    ]
    lines = distant_content_warning(layers)
    assert lines[0].startswith("Warning: the windows planned in layers 0 (0.45), 6 (0.21) discard")


def test_no_warning_without_such_windows():
    assert distant_content_warning([row(0, "sliding_attention", 0.3, 0.29), row(1, "full_attention", 0.9, 0.0)]) == []
