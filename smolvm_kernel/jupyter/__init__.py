"""The relaying kernel, its output policy, %smolvm lines, magics, panel, kernelspecs."""
