"""Terminal rendering shared by the CLI commands and the REPL (the library itself never prints)."""

from __future__ import annotations

import sys
from typing import Optional, TextIO

from ovchat.progress import Progress
from ovchat.units import human_size


def format_metrics(m, *, context_used: Optional[int] = None, context_limit: Optional[int] = None) -> str:
    """One line per figure of a TurnMetrics (or None before the first reply), plus context usage."""
    lines = []
    if m is not None:
        lines += [
            f"prompt tokens:     {m.prompt_tokens}",
            f"generated tokens:  {m.generated_tokens} ({m.finish_reason})",
            f"time to first tok: {m.ttft_s * 1000:.0f} ms",
            f"decode speed:      {m.decode_tokens_per_s:.1f} tokens/s",
            f"generation time:   {m.generate_s:.2f} s",
            f"model load time:   {m.load_s:.2f} s",
        ]
        if m.tokens_per_step is not None and m.tokens_per_step > 1.0:
            lines.append(f"speculation:       {m.tokens_per_step:.2f} tokens per model step")
        context_used = m.context_used if context_used is None else context_used
        context_limit = m.context_limit if context_limit is None else context_limit
    if context_used is not None:
        if context_limit:
            share = 100 * context_used / context_limit
            lines.append(f"context window:    {context_used} / {context_limit} tokens ({share:.1f}%)")
        else:
            lines.append(f"context window:    {context_used} tokens (model limit unknown)")
    return "\n".join(lines)


class ProgressPrinter:
    """Render Progress reports on stderr: a live bar on a terminal, a few plain lines otherwise."""

    def __init__(self, stream: TextIO = sys.stderr, *, prefix: str = "ovchat: "):
        self.stream = stream
        self.prefix = prefix
        self.live = stream.isatty()
        self._last_message = None
        self._bar_open = False
        self._last_percent = -1

    def __call__(self, p: Progress) -> None:
        if p.done is None or not p.total:
            self._close_bar()
            self.stream.write(f"{self.prefix}{p.message}\n")
            self._last_message = p.message
            self.stream.flush()
            return
        percent = min(100, int(100 * p.done / p.total))
        if self.live:
            filled = percent * 30 // 100
            self.stream.write(f"\r{self.prefix}{p.message} [{'#' * filled}{'.' * (30 - filled)}] {percent:3d}%")
            self._bar_open = True
            if p.done >= p.total:
                self._close_bar()
        elif p.message != self._last_message or (p.done >= p.total and self._last_percent != 100):
            # Without a terminal, say when a step starts and when it ends, not every tick.
            if p.message != self._last_message:
                self.stream.write(f"{self.prefix}{p.message}...\n")
            if p.done >= p.total:
                self.stream.write(f"{self.prefix}{p.message}: done\n")
            self._last_message = p.message
        self._last_percent = percent
        self.stream.flush()

    def _close_bar(self) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False


def format_info(info: dict) -> str:
    """`ovchat info` as text: the facts first, then the manifest's recipe, bitwidths and files."""
    manifest = info.get("manifest") or {}
    lines = []
    if info.get("name"):
        lines.append(f"name:            {info['name']}")
    lines += [
        f"path:            {info['path']}",
        f"kind:            {info['kind']}",
        f"architecture:    {info.get('architecture') or '?'}",
        f"context length:  {info.get('context_length') or 'unknown'}",
        f"chat template:   {'yes' if info.get('chat_template') else 'no'}",
        f"size:            {human_size(info.get('size', 0))}",
    ]
    embedding = manifest.get("embedding")
    if isinstance(embedding, dict):
        lines.append(f"embeddings:      {embedding.get('dimensions')} dimensions, {embedding.get('mode')} pooling"
                     f"{', normalized' if embedding.get('normalize') else ''}, inputs cut at "
                     f"{embedding.get('max_length')} tokens")
    source = manifest.get("store", {}).get("source") or manifest.get("source", {}).get("path")
    if source:
        lines.append(f"source:          {source}")
    revision = manifest.get("store", {}).get("revision")
    if revision:
        lines.append(f"revision:        {revision}")
    recipe = manifest.get("recipe")
    if recipe:
        lines.append("recipe:          " + ", ".join(f"{k}={v}" for k, v in recipe.items()))
    bitwidths = manifest.get("bitwidth_distribution")
    if bitwidths:
        lines.append("bitwidths:")
        lines.append(format_bitwidths(bitwidths))
    kept = manifest.get("kept")
    if kept:
        lines.append("kept from the GGUF (the same values, no second quantization):")
        lines += [f"  {qtype:<8} {row.get('tensors', '?')} tensors, {row.get('parameters', 0) / 1e6:.1f}M weights "
                  f"as {row.get('form', '?')}" for qtype, row in kept.items() if isinstance(row, dict)]
    options = manifest.get("runtime_options")
    if options:
        lines.append("runtime options: " + ", ".join(f"{k}={v}" for k, v in options.items()))
    lines.append("receipt:         " + format_receipt(manifest.get("receipt")))
    versions = manifest.get("versions")
    if versions:
        lines.append("versions:        " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    if manifest.get("created"):
        lines.append(f"created:         {manifest['created']}")
    if info.get("files"):
        lines.append("files:")
        lines += [f"  {name:<32} {human_size(size):>10}" for name, size in info["files"].items()]
    problems = info.get("problems") or []
    if problems:
        lines.append("damaged:         " + "; ".join(problems))
    elif manifest.get("files"):
        lines.append("integrity:       all files match their sha256")
    return "\n".join(lines)


def format_receipt(receipt) -> str:
    """The accuracy receipt in one line."""
    if not isinstance(receipt, dict) or not receipt:
        return "none (converted before ovchat measured receipts)"
    if "skipped" in receipt:
        return f"not measured: {receipt['skipped']}"
    try:
        if "mean_cosine" in receipt:  # a sentence encoder's
            return (f"cosine similarity {receipt['mean_cosine']:.6f} on average and {receipt['min_cosine']:.6f} at "
                    f"worst with the float weights' vectors, over {receipt['sentences']} sentences "
                    f"({receipt.get('text', '?')})")
        return (f"top-1 agreement {100 * receipt['top1_agreement']:.1f}% with the float weights, mean KL "
                f"divergence {receipt['mean_kl']:.3g}, over {receipt['tokens']} tokens ({receipt.get('text', '?')})")
    except (KeyError, TypeError, ValueError):
        return "unreadable"


def format_distribution(distribution: dict) -> str:
    """NNCF's bitwidth table (as the manifest stores it) as plain text lines."""
    lines = [f"{'Weight compression mode':<28} {'% all parameters (layers)':<28} % ratio-defining parameters (layers)"]
    for label, row in distribution.items():
        share = f"{row['parameters_percent']:5.1f}% ({row['layers']})"
        lines.append(f"{label:<28} {share:<28} {row['ratio_defining_parameters_percent']:5.1f}% "
                     f"({row['ratio_defining_layers']})")
    return "\n".join(lines)


def format_bitwidths(distribution: dict) -> str:
    """The bitwidth table, indented."""
    return "\n".join("  " + line for line in format_distribution(distribution).splitlines())


# (label, field, scale, format) of each row of `ovchat bench`'s table.
_BENCH_ROWS = (
    ("load time", "load_s", 1.0, "{:.2f} s"),
    ("time to first token", "ttft_s", 1000.0, "{:.0f} ms"),
    ("decode speed", "decode_tokens_per_s", 1.0, "{:.1f} tok/s"),
    ("peak RSS", "peak_rss_bytes", 1 / 1024 ** 2, "{:.0f} MB"),
    ("cold start to 1st token", "cold_start_s", 1.0, "{:.2f} s"),
)


def format_bench(result) -> str:
    """A BenchResult as a table: one row per figure, median, min and max over the runs."""
    header = (f"{result.model} on {result.device}: {result.prompt_tokens}-token prompt, "
              f"{result.new_tokens} new tokens, {len(result.runs)} run{'s' if len(result.runs) > 1 else ''} "
              f"(+1 warm-up)")
    rows = [("", "median", "min", "max")]
    for label, name, scale, fmt in _BENCH_ROWS:
        stat = result.summary[name]
        rows.append((label, *(fmt.format(v * scale) for v in (stat.median, stat.min, stat.max))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [header] + ["  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])
                        for r in rows]
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in result.versions.items()))
    lines.append(f"peak RSS: {result.rss_scope}")
    return "\n".join(lines)
