"""`advisor eval`: perplexity of a model by the standard protocol."""
from __future__ import annotations

import argparse

from advisor.commands._common import add_json_arg, add_model_args, add_protocol_args, load_model, protocol_from


def add_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_protocol_args(p, calib=False)
    add_json_arg(p)


def run(args: argparse.Namespace) -> int:
    from advisor.cli import emit_json
    from advisor.models.evaluate import perplexity

    protocol = protocol_from(args)  # validated before the model loads
    loaded = load_model(args, job="eval")
    windows = protocol.eval_windows(loaded)
    result = perplexity(loaded.model, windows, batch_size=protocol.batch_size)
    out = dict(result.to_dict(), model=loaded.source.to_dict())
    if args.json:
        from advisor.jsonio import document

        emit_json(document(out, confidence=None, eval_protocol=windows.protocol))
    else:
        print(f"{args.model}: perplexity {result.ppl:.4f} (mean NLL {result.nll:.5f} nats over "
              f"{result.n_tokens} tokens, {windows.protocol['n_windows']} x {args.seq_len}-token windows "
              f"of {windows.protocol['dataset']} [{windows.protocol.get('format')}], {result.seconds:.1f}s)")
        for note in loaded.source.notes:
            print(f"note: {note}")
    return 0
