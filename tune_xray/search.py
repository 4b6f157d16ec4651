"""`python -m tune_xray.search STUDY`: the search's command line (tune_xray.command: its options and their
help) made one typed request (tune_xray.request) and run (tune_xray.pipeline), its summary printed, and its end
told by the exit code: 0 done, 2 a config or data error before compute, 130 interrupted (`--resume` continues it),
1 a failure."""

from __future__ import annotations

import shlex
import sys

from .command import build_parser, given_keys, named_study
from .config import ConfigError
from .credentials import mask, mask_argv
from .data.splits import DataError
from .models import WeightsError
from .pipeline import SearchError, resume_command, run_search
from .request import SearchRequest
from .summary import exit_code, print_summary


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):  # after a study's name, its space too
        parser.print_help()
        study = named_study(parser, argv)
        if study:
            from .space import describe_study, load_study

            try:
                print("\n" + describe_study(load_study(study)))
            except ConfigError as err:
                print(f"\nerror: {mask(str(err))}", file=sys.stderr)
                return 2
        return 0
    args = parser.parse_args(argv)
    request = SearchRequest.from_values(vars(args), given=given_keys(argv, vars(args)),
                                        command=shlex.join(["python", "-m", "tune_xray.search", *mask_argv(argv)]))
    try:
        summary = run_search(request)
    except (ConfigError, DataError, WeightsError) as err:
        print(f"error: {mask(str(err))}", file=sys.stderr)
        return 2
    except SearchError as err:
        print(f"error: {mask(str(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the trials started (Tune handles Ctrl-C while they run)
        print("interrupted before any trial ran", file=sys.stderr)
        return 130
    print_summary(summary, resume_command(request))
    return exit_code(summary)


if __name__ == "__main__":
    sys.exit(main())
