"""lm-eval `--include_path` folder: offline copies of the paper tasks (`*_local`, group `bliss_paper_local`)
and the `bliss_ref_cloze` task. lm-eval reads the YAMLs; `utils.py` / `ref_cloze.py` are their dataset hooks.
"""
