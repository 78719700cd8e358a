from tap_commerce_exports.sandbox.server import main

main()
