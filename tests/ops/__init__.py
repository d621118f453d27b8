# A package so that tests/ops/test_<op>.py and a model-level tests/test_<op>.py may share a basename.
