"""Evaluation and benchmarking of a hybrid against its teacher: `hybridize eval` and `hybridize bench`.

For scripts: `quality.compare(student, teacher, tokenizer, small=True)` and
`bench.small_bench(student, teacher, tokenizer)` return (results dict, printable table).
"""
