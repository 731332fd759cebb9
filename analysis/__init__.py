"""What only reads results: runs -> tables -> figures -> report, and the toy model of robust features.

Nothing here trains or attacks a task model; nothing in the engine (``samat.common``) imports from here.
"""
