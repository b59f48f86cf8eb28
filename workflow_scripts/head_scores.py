from mechdistill.logutil import job_logging
from mechdistill.paths import SPLIT_FILES
from mechdistill.stages.characterize import run_head_scores

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    # rules head_scores (heads.split) and style_head_scores (a compared clean-prompt style: {split})
    wc, inp, out = snakemake.wildcards, snakemake.input, snakemake.output
    with job_logging(snakemake.log[0]):
        run_head_scores(snakemake.config, wc.dataset, wc.model, wc.get("split"), inputs={k: inp[k] for k in SPLIT_FILES},
                        coarse_path=out.coarse, refine_path=out.refine, example_path=out.get("example"))
