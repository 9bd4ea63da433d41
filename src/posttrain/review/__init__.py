"""Human review of runs: ``posttrain review runs/<name>`` serves a live page of a run's plots, doctor events
and samples, where a person labels samples good, bad or reward-hacked; the labels become preference pairs
(``--export-pairs``) and a doctor event (``human_flagged_hacking``).

    samples   samples.jsonl as one row per completion: ids, the doctor's per-sample flags, filters
    labels    reviews.jsonl: atomic, serialised label writes; the preference pairs they make
    server    the Starlette app (uvicorn): read endpoints, the token-guarded label write, the plots
    static/   the page itself (HTML, JS, CSS): shipped with the package, nothing from a network

The doctrine names human oversight ("periodic quality checks") as a reward-hacking mitigation; this is
where it happens, and where what a person saw feeds back into training.
"""
