"""Runs the unittest cases of __main__ and, under Bazel, writes their results
as JUnit XML to $XML_OUTPUT_FILE, so that each case counts on its own."""

import os
import sys
import time
import unittest
import xml.etree.ElementTree as ET


class _Result(unittest.TextTestResult):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cases = []  # (test, outcome, detail, seconds)
        self._start = 0.0

    def startTest(self, test):
        self._start = time.time()
        super().startTest(test)

    def _add(self, test, outcome, detail=""):
        self.cases.append((test, outcome, detail, time.time() - self._start))

    def addSuccess(self, test):
        super().addSuccess(test)
        self._add(test, "pass")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._add(test, "failure", self._exc_info_to_string(err, test))

    def addError(self, test, err):
        super().addError(test, err)
        self._add(test, "error", self._exc_info_to_string(err, test))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._add(test, "skipped", reason)


def main():
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules["__main__"])
    result = unittest.TextTestRunner(verbosity=2, resultclass=_Result).run(suite)
    path = os.environ.get("XML_OUTPUT_FILE")
    if path:
        suites = ET.Element("testsuites")
        s = ET.SubElement(suites, "testsuite", name=os.path.basename(sys.argv[0]),
                          tests=str(len(result.cases)), failures=str(len(result.failures)),
                          errors=str(len(result.errors)), skipped=str(len(result.skipped)))
        for test, outcome, detail, seconds in result.cases:
            case = ET.SubElement(s, "testcase", name=test._testMethodName,
                                 classname=type(test).__name__, time=f"{seconds:.3f}")
            if outcome in ("failure", "error"):
                ET.SubElement(case, outcome, message=detail.splitlines()[-1] if detail else "").text = detail
            elif outcome == "skipped":
                ET.SubElement(case, "skipped", message=detail)
        ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)
    sys.exit(0 if result.wasSuccessful() else 1)
