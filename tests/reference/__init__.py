"""Reference implementations that the tests and benchmarks compare our code against."""
