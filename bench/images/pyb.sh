# The python image with the config's Cmd ["bash"]: the same layers, and the
# same command given at ctr run, but nothing in the config names python3.
image_pyb() {
    image_py
    desc='the python image with config Cmd ["bash"] (same layers)'
    cmd='["bash"]'
    same_layers=py
    profile=hello-bash
}
workload_hello_bash() {
    workload_hello
    image=pyb
    what="\`python3 -c 'print(\"hi\")'\` on the python image whose config Cmd is bash"
}
