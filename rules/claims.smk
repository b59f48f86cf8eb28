# A verdict on each claim of the paper (Secs. 2-4), from this run's head scores, patching files and
# student metrics: results/claims.md and results/claims.parquet.


rule claims:
    input:
        unpack(lambda wc: paths.claims_inputs(config)),
    output:
        md=report(paths.claims("md"), caption="../report/claims.rst", category="Claims"),
        parquet=paths.claims("parquet"),
    params:
        evaluate_bootstrap=config["evaluate"]["n_bootstrap"],
        patching=canonical({k: config["patching"][k] for k in ("min_gap", "n_bootstrap")}),
        pool_sizes=canonical({p: config["distill"]["pools"][p]["k"] for p in paths.PHASES}),
        methods=canonical(config["methods"]),
        seed=config["seed"],
    log:
        paths.log("claims", "claims"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/claims.py"
