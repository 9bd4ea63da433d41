"""The doctrine (RL_DOCTRINE.md) as tools: which method to use, whether it fits in memory, what went
wrong in a run, and a report to read it.

Apart from the pipeline (data and tasks -> sampling -> rewards -> the math (objectives) ->
algorithms -> commands): these tools read specs, datasets and run directories, and never train. The
trainers call the doctor at every step (posttrain.algorithms imports posttrain.doctrine, never the
reverse); `posttrain recommend`, `memory`, `doctor`, `report` and `eval --suite` are their commands.
Within the package, the doctor writes the report and passes it the events: the report never imports
the doctor.

Modules:
    select        the decision tree of "Method Selection": recommend, choose_method (``train auto``)
    memory        peak memory per method x model size x LoRA, from a stated formula with its breakdown
    doctor/       the debugging table and reward-hacking section as rules, live in training and after
    report        report.html with PNG plots: reward vs KL, length, entropy, doctor events, samples
    adversarial/  adversarial evaluation suites: sycophancy (agreeing with a false user claim)
"""
