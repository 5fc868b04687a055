"""DVC stage pin@<model>: a path, hub or GGUF model from params.yaml's `models`, put into data/models/<model>.

No weights are copied: the directory holds links to the model's files and pin.json (where they came from, the
resolved hub commit); a GGUF model's weights are dequantised there, beside a link to the file. See fusesoup/pin.py
for why this makes DVC rerun exactly what a model change affects.
"""
from __future__ import annotations

from fusesoup.cli import run_stage, stage_parser
from fusesoup.errors import StageError
from fusesoup.params import load_params
from fusesoup.pin import describe, pin_model


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("stages.pin", __doc__, ["out"])
    parser.add_argument("model", help="the model: a key of params.yaml's models")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.model not in params.models:
        raise StageError(f"{args.params}: {args.model!r} is not under 'models' (defined: {sorted(params.models)})")
    print(describe(pin_model(args.model, params.models[args.model], args.out)))


if __name__ == "__main__":
    run_stage(main)
