"""`yoda convert`: import a checkpoint of the reference YODA implementation as a model directory."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` subcommand."""
    p = subparsers.add_parser(
        "convert",
        help="import a reference YODA checkpoint (.pt/.pth) as a yoda model directory",
        description="Read a checkpoint of the reference YODA implementation (a MONAI Generative "
        "DiffusionModelUNet state dict, possibly nested under 'model', 'state_dict' or 'ema') "
        "without executing code from it (torch.load weights_only=True), rename its tensors for "
        "the current MONAI network, check every tensor's name and shape, and write a model "
        "directory (EMA and raw weights as safetensors, model.json).",
    )
    p.add_argument("--checkpoint", required=True, metavar="PT", help="reference checkpoint")
    p.add_argument(
        "--sources",
        nargs="+",
        required=True,
        metavar="NAME",
        help="source modalities in the order the model was trained with (e.g. t1w t2w)",
    )
    p.add_argument("--target", required=True, metavar="NAME", help="target modality (e.g. flair)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the model files of an existing non-empty --out folder (refused otherwise)",
    )
    p.add_argument(
        "--preset", default="small", help="network preset of the checkpoint (default: small)"
    )
    p.add_argument("--n-slices", type=int, default=5, help="slab thickness n (default: 5)")
    p.add_argument(
        "--prediction", default="v", choices=("v", "eps", "x0"), help="network output (default: v)"
    )
    p.add_argument(
        "--schedule",
        default="linear",
        choices=("linear", "cosine"),
        help="noise schedule (default: linear)",
    )
    p.add_argument(
        "--T", type=int, default=1000, help="diffusion timesteps, 1..100000 (default: 1000)"
    )
    p.add_argument(
        "--normalization",
        default="percentile",
        choices=("percentile", "tissue", "ct"),
        help="intensity normalization the inputs need (default: percentile, as the reference)",
    )
    p.add_argument(
        "--key",
        default=None,
        help="dotted entry of the checkpoint holding the weights (default: the 'ema' entry as "
        "EMA weights and another entry as raw weights)",
    )
    p.add_argument("--notes", default="", help="free-form notes stored in the model card")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Convert the checkpoint; print where the model directory was written."""
    import shlex
    import sys

    from yoda.model.checkpoint import convert_reference_checkpoint, read_card

    notes = args.notes or ("converted with: yoda " + shlex.join(sys.argv[1:]))
    out = convert_reference_checkpoint(
        args.checkpoint,
        args.out,
        sources=[s.lower() for s in args.sources],
        target=args.target.lower(),
        network=args.preset,
        n_slices=args.n_slices,
        prediction=args.prediction,
        schedule=args.schedule,
        T=args.T,
        normalization={"method": args.normalization},
        key=args.key,
        notes=notes,
        force=args.force,
    )
    card = read_card(out)
    print(
        f"wrote {out}: {' + '.join(card.sources)} -> {card.target}, preset {args.preset}, "
        f"n={card.n_slices}, {card.prediction}-prediction, {card.schedule} T={card.T}",
        flush=True,
    )
    return 0
