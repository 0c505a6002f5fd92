"""Writes jsonpath-ng's parse tables once, into its installed packages.

LocalStack's Step Functions builds a jsonpath-ng parser for every path it
evaluates, and jsonpath-ng asks PLY for its tables with write_tables=0: with
no table module installed, PLY regenerates the LALR tables each time (about
29 ms of CPU a path; the sharded round's Maps evaluate hundreds of paths a
round). With the table modules in place PLY only checks their signature and
loads them (about 1.6 ms). Same grammar, same results: only the cache is new.
Run with the LocalStack venv's python (scripts/emulators.sh install).
"""

import importlib
import os
import time

import ply.yacc
# (sic: the class is spelt so in jsonpath-ng)
from jsonpath_ng.ext.parser import ExtentedJsonPathParser
from jsonpath_ng.parser import JsonPathParser


def build(cls):
    started = time.perf_counter()
    cls().parse("$.a.b[0]")
    return time.perf_counter() - started


for cls in (JsonPathParser, ExtentedJsonPathParser):
    before = build(cls)
    parser = cls()
    package_dir = os.path.dirname(importlib.import_module(cls.__module__).__file__)
    # The names jsonpath-ng's own yacc() call uses: the tabmodule is looked
    # up in the package of the parser's class.
    ply.yacc.yacc(
        module=parser,
        debug=False,
        tabmodule="parser_jsonpath_parsetab",
        outputdir=package_dir,
        write_tables=1,
        start="jsonpath",
        errorlog=ply.yacc.NullLogger(),
    )
    importlib.invalidate_caches()
    after = build(cls)
    print(f"{cls.__name__}: a parser in {before * 1000:.1f} ms before, {after * 1000:.1f} ms after")
