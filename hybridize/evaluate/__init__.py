"""Evaluation and benchmarking of a hybrid against its teacher: `hybridize eval` and `hybridize bench`.

For scripts: `io.evaluate_to_folder(hybrid, out_dir, settings)` and `io.bench_to_folder(...)` do what the commands
do and return the JSON they wrote; on models already loaded, `quality.compare(student, teacher, tokenizer,
small=True)` and `bench.small_bench(student, teacher, tokenizer)` return (results dict, printable table).
"""
