# The python image: the config's Cmd is python3 (the entrypoint prefetch
# knows the program). Workloads hello, imports, warm, readall.
image_py() {
    desc='Debian bookworm minbase + python3 + python3-pip, config Cmd ["python3"]'
    cmd='["python3"]'
    layers=(
        "apt-get install -y --no-install-recommends python3"
        "apt-get install -y --no-install-recommends python3-pip"
    )
    same_layers=
    profile=hello
}
workload_hello() {
    image=py bound=1 expect='^hi$'
    argv=(python3 -c 'print("hi")')
    what="\`python3 -c 'print(\"hi\")'\`"
}
workload_imports() {
    image=py bound=1 expect='^imported$'
    argv=(python3 -c 'import json, email, http.server, sqlite3, unittest, asyncio, xml.dom.minidom; print("imported")')
    what="python3 importing json, email, http.server, sqlite3, unittest, asyncio, xml.dom.minidom"
}
workload_warm() {
    workload_hello
    bound=0
    what="a second container of the same image (node already warm); pull column = 0"
}
workload_readall() {
    image=py bound=0 expect='^[0-9]+$'
    argv=(sh -c 'find /usr -xdev -type f -exec cat {} + | wc -c')
    what="\`find /usr -type f -exec cat {} +\` (reads most of the image)"
}
