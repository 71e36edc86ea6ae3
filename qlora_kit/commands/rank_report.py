"""`qlora-kit rank-report ADAPTER_DIR`: how much of its rank each adapted module uses, and an r to try next."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("rank-report", help="singular values of each module's scale*B@A, ranks holding 90%%/99%% "
                                           "of the energy, and a suggested r")
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter folder (PEFT layout)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="write a PNG of the spectra")
    p.add_argument("--change", action="store_true",
                   help="for svd/loftq adapters: measure what training changed, scale*(B@A - B0@A0)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..rank import format_rank_report, plot_spectra, rank_report, write_json

    report = rank_report(args.adapter, change=args.change)
    print(write_json(report) if args.json else format_rank_report(report), end="\n" if args.json else "")
    if args.plot:
        print(f"wrote {plot_spectra(report, args.plot)}")
    return 0
