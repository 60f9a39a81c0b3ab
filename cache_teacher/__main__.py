from cache_teacher.cli import main

main()
