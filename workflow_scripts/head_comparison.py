from mechdistill.logutil import job_logging
from mechdistill.stages.model_free import run_head_comparison

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    wc, inp, out = snakemake.wildcards, snakemake.input, snakemake.output
    with job_logging(snakemake.log[0]):
        run_head_comparison(snakemake.config, wc.dataset, coarse_path=inp.coarse, refine_path=inp.refine,
                            style_paths=list(inp.styles), md_path=out.md, parquet_path=out.parquet)
