"""``minorsft precompute``: score every sample with the frozen reference model (``docs/precompute.md``).

Reads top to bottom: resolve engine and dtype, render nothing yet but identify the
run (model, tokenizer, data fingerprints), refuse an output directory written by a
different run, pick this worker's unfinished chunks, load the engine only if there
are any, then per chunk: render -> score -> write rejects -> write shard. Finally
the worker's totals are read back from disk, checked (scored + rejected = input
rows) and saved as ``summary-w{I}.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from minorsft_core import model_dir, schema
from minorsft_core.atomic import write_text_atomic
from minorsft_core.batching import resolve_dtype
from minorsft_core.config import PrecomputeConfig, save_config
from minorsft_core.data import Reject, Sample, SampleRenderer, detect_input_format
from minorsft_core.errors import EXIT_OK, ConfigError, DataError, EngineError, InputError
from precompute import engines, output, plan

log = logging.getLogger("minorsft.precompute")


class Progress:
    """tqdm bar of input rows with the scoring rate in tokens/s; in quiet mode no bar,
    one log line per chunk instead. ``scoring_s`` counts the engine's scoring calls only
    (not rendering, writing, or the engine's start-up and shutdown)."""

    def __init__(self, total_rows: int, quiet: bool):
        self.bar = tqdm(total=total_rows, unit="row", disable=quiet, file=sys.stderr, dynamic_ncols=True)
        self.tokens = 0
        self.scoring_s = 0.0
        self.start = time.monotonic()

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.monotonic() - self.start, 1e-9)

    def scored(self, rows: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(rows)
        self.bar.set_postfix_str(f"{self.tokens_per_s:,.0f} tok/s", refresh=False)

    def rejected(self, rows: int) -> None:
        self.bar.update(rows)


def setup_logging() -> None:
    """Our lines on stderr with a timestamp; the engines' own loggers are left alone."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s minorsft precompute: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


DEFAULT_MAX_SEQ_LEN = 4096


def resolve_max_seq_len(config: PrecomputeConfig) -> PrecomputeConfig:
    """``config`` with ``--max-seq-len`` set: by default the smaller of 4096 and the
    model's context; a larger explicit value is an option error (exit 2)."""
    limit = model_dir.context_length(config.model)
    if config.max_seq_len is None:
        return dataclasses.replace(config, max_seq_len=min(DEFAULT_MAX_SEQ_LEN, limit or DEFAULT_MAX_SEQ_LEN))
    if limit is not None and config.max_seq_len > limit:
        raise ConfigError(f"max_seq_len: {config.max_seq_len} exceeds the model's context ({limit} positions, "
                          f"{config.model}/config.json); lower it or leave it out (default min(4096, context))")
    return config


def score_chunks(config: PrecomputeConfig, engine: engines.Engine, renderer: SampleRenderer,
                 run: schema.ShardMetadata, todo: list[int], progress: Progress) -> None:
    out = Path(config.output)
    chunks = plan.iter_chunk_records(config.data, config.chunk_rows, todo)
    for done, (j, records) in enumerate(chunks, start=1):
        rendered = [renderer.render(row, record) for row, record in records]
        samples = [r for r in rendered if isinstance(r, Sample)]
        rejects = [r for r in rendered if isinstance(r, Reject)]
        progress.rejected(len(rejects))
        chunk_start = time.monotonic()
        scores = engine.score(samples, progress.scored) if samples else engines.Scores.empty()
        progress.scoring_s += time.monotonic() - chunk_start
        table = output.chunk_table(samples, scores, config.store_token_logps)
        output.write_chunk(out, plan.chunk_metadata(run, j, len(samples), len(rejects)), table, rejects)
        if config.quiet:
            seconds = time.monotonic() - chunk_start
            tokens = sum(len(s.input_ids) for s in samples)
            log.info("%s (%d/%d this run): %d rows, %d scored, %d rejected, %d tokens in %.1f s (%.0f tok/s)",
                     schema.shard_path(out, j).name, done, len(todo), len(records), len(samples), len(rejects),
                     tokens, seconds, tokens / max(seconds, 1e-9))


def main(config: PrecomputeConfig) -> int:
    setup_logging()
    started = time.monotonic()
    out = Path(config.output)
    engine_name = engines.resolve_engine(config.engine)
    try:
        engine_version = engines.engine_version(engine_name)
    except ModuleNotFoundError as err:  # an option this environment cannot honour; retrying will not help
        raise ConfigError(str(err)) from err
    dtype = resolve_dtype(config.dtype)
    if engine_name == "hf" and config.tensor_parallel_size > 1:
        log.warning("--tensor-parallel-size %d: the hf engine runs on one device and ignores it",
                    config.tensor_parallel_size)

    config = resolve_max_seq_len(config)
    config = dataclasses.replace(config, max_batch_tokens=engines.batch_tokens(config, engine_name))
    tokenizer = model_dir.load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    data_format = detect_input_format(config.data) if config.format == "auto" else config.format
    renderer = SampleRenderer(tokenizer, data_format=data_format, template=config.template,
                              max_seq_len=config.max_seq_len, truncate_answer=config.truncate_answer)
    run = plan.run_metadata(config, tokenizer=tokenizer, engine=engine_name, engine_version=engine_version,
                            dtype=dtype, data_format=data_format, num_input_rows=plan.count_rows(config.data))
    done = plan.finished_chunks(out, run) if out.is_dir() else set()
    mine = plan.owned_chunks(run.num_chunks, config.num_workers, config.worker_index)
    todo = [j for j in mine if j not in done]
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / f"config-w{config.worker_index}.yaml")
    log.info("%d input rows (%s) in %d chunks; worker %d/%d owns %d, %d already done; engine %s (%s), %s",
             run.num_input_rows, data_format, run.num_chunks, config.worker_index, config.num_workers,
             len(mine), len(mine) - len(todo), engine_name, engine_version, dtype)

    tokens_scored, scoring_s, start_s, close_s = 0, 0.0, None, None
    if todo:
        plan.remove_stale_temp_files(out, todo)
        start_s = time.monotonic()
        try:
            engine = engines.make_engine(config, engine_name, dtype)
        except Exception as err:
            log.exception("engine %s failed to start", engine_name)
            hint = engines.start_failure_hint(config, engine_name, err)
            raise EngineError(f"engine {engine_name} failed to start: {err}{hint}") from err
        start_s = time.monotonic() - start_s
        progress = Progress(sum(_chunk_rows(run, j) for j in todo), config.quiet)
        try:
            score_chunks(config, engine, renderer, run, todo, progress)
        except (InputError, OSError):
            raise  # bad input or a full disk: not the engine's fault
        except Exception as err:
            log.exception("engine %s failed while scoring", engine_name)
            raise EngineError(f"engine {engine_name} failed while scoring: {err}") from err
        finally:
            progress.bar.close()
            close_s = time.monotonic()
            engine.close()
            close_s = time.monotonic() - close_s
        tokens_scored, scoring_s = progress.tokens, progress.scoring_s

    totals = output.worker_totals(out, run, mine)
    expected_rows = sum(_chunk_rows(run, j) for j in mine)
    if totals.rows_scored + totals.rows_rejected != expected_rows:
        raise schema.ContractError(
            f"{out}: worker {config.worker_index} accounts for {totals.rows_scored} scored + "
            f"{totals.rows_rejected} rejected rows, its chunks hold {expected_rows}; delete its shards and re-run")
    summary = {
        **dataclasses.asdict(totals),
        "worker_index": config.worker_index,
        "num_workers": config.num_workers,
        "chunks": len(mine),
        "chunks_scored_now": len(todo),
        "tokens_scored_now": tokens_scored,
        "tokens_per_s": round(tokens_scored / scoring_s, 1) if scoring_s else None,  # scoring calls only
        "scoring_s": round(scoring_s, 2),
        "engine_start_s": None if start_s is None else round(start_s, 2),
        "engine_close_s": None if close_s is None else round(close_s, 2),
        "wall_s": round(time.monotonic() - started, 2),
        "engine": engine_name,
        "engine_version": engine_version,
        "dtype": dtype,
        "model": run.reference_model,
    }
    write_text_atomic(out / f"summary-w{config.worker_index}.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if config.num_workers == 1 and totals.rows_scored == 0:
        raise DataError(f"{config.data}: every row was rejected; see {out}/rejects-*.jsonl for the reasons")
    return EXIT_OK


def _chunk_rows(run: schema.ShardMetadata, j: int) -> int:
    start, stop = plan.chunk_metadata(run, j, 0, 0).chunk_row_range()
    return stop - start
