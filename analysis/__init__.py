"""What works from outside the engine, on finished runs and run folders: runs -> tables -> figures -> report,
the sweep that lays out and launches a grid of ``scripts/run.py`` calls, and the toy model of robust features.

- ``runs``: find and read results.json files into typed runs, group them into settings;
- ``tables``: the columns runs hold, markdown tables of settings, CSV rows of runs and settings;
- ``figures``: the report's plots (reads runs and settings only);
- ``report``: builds and writes report.md, the CSVs and the figures;
- ``sweep``: plans a grid of runs into folders (skip finished, resume interrupted) and runs them in turn;
- ``reproduce`` / ``verdicts``: the paper's grid per task and scale, and a verdict per claim from paired seeds;
- ``toy`` / ``toy_report``: the toy model of robust / non-robust features, and its experiment's outputs.

Nothing here trains a task model in-process; nothing in the engine (``samat.common``) imports from here.
"""
