"""The closing table of a run: held-out bits per byte of the teacher and the student."""
from __future__ import annotations


def summary_table(summary: dict) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    rows = [("teacher, token level", summary.get("teacher_token_bpb")),
            (f"teacher, byte level ({summary.get('conversion', 'cover')})", summary.get("teacher_byte_bpb")),
            ("conversion gap (byte - token)", summary.get("conversion_gap")),
            ("student before", summary.get("student_bpb_before")),
            (f"student after {summary['steps']} steps ({summary['method']})", summary.get("student_bpb_after"))]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'held-out bits per byte'.ljust(width)} | value  |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {name.ljust(width)} | {fmt(value)} |" for name, value in rows]
    return "\n".join(lines)
