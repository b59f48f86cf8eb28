# A verdict on each claim of the paper (Secs. 2-4), from this run's head scores, patching files and
# student metrics: results/claims.md and results/claims.parquet.

from mechdistill.evaluate.settings import ClaimSettings


rule claims:
    input:
        unpack(lambda wc: paths.claims_inputs(config)),
    output:
        md=report(paths.claims("md"), caption="../report/claims.rst", category="Claims"),
        parquet=paths.claims("parquet"),
    params:
        settings=settings_of(ClaimSettings),
    log:
        paths.log("claims", "claims"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/claims.py"
