@echo off
rem Windows launcher: the same commands as run.sh, as a menu. All logic is in Python.
rem   start_training.bat            menu
rem   start_training.bat status     (or: demo, test, start, monitor, stop, profile, config, optimize, plan,
rem                                  watch, gru, classifier, asr, lm, sft, asr-memory-optimized --
rem                                  the same words as ./run.sh)
rem   start_training.bat status --runs DIR   (status, monitor, stop: another runs folder)
rem   start_training.bat start gru --nproc 2 [flags]   (N processes under torchrun, as ./run.sh start)
setlocal
cd /d "%~dp0"
set PY=.venv\Scripts\python.exe
if not exist "%PY%" (
  echo creating .venv (one time^)
  python -m venv .venv || (echo error: Python 3.9+ must be on PATH & exit /b 2)
  "%PY%" -m pip install -q -r requirements.txt || exit /b 2
)
if not "%~1"=="" goto direct

:menu
echo.
echo  lean-train: CADENCE GRU query generator
echo   1  Quick     (seed's "15 min" mode: 5,000 queries, 3 epochs)
echo   2  Standard  (seed's "30 min" mode: 10,000 queries, 5 epochs)
echo   3  Extended  (seed's "60 min" mode: 20,000 queries, 8 epochs)
echo   4  Status of all runs
echo   5  Monitor the newest run
echo   6  Stop the newest running run (it saves first)
echo   7  Profile this machine and write optimal_config.json
echo   8  Receipt classifier, quick run (train_classifier.py --quick)
echo   9  Speech recognizer, quick run (train_asr.py --quick)
echo  10  Language model, quick run (train_lm.py --quick)
echo  11  Shell-command assistant, quick fine-tune (train_sft.py --quick)
echo   0  Exit
set /p choice="Choose: "
if "%choice%"=="1" "%PY%" memory_optimizer.py start gru --quick
if "%choice%"=="2" "%PY%" memory_optimizer.py start gru --dataset-size 10000 --epochs 5
if "%choice%"=="3" "%PY%" memory_optimizer.py start gru --dataset-size 20000 --epochs 8
if "%choice%"=="4" "%PY%" memory_optimizer.py status
if "%choice%"=="5" "%PY%" memory_optimizer.py monitor --latest
if "%choice%"=="6" "%PY%" memory_optimizer.py stop
if "%choice%"=="7" ("%PY%" memory_optimizer.py profile & "%PY%" memory_optimizer.py config)
if "%choice%"=="8" "%PY%" memory_optimizer.py start classifier --quick
if "%choice%"=="9" "%PY%" memory_optimizer.py start asr --quick
if "%choice%"=="10" "%PY%" memory_optimizer.py start lm --quick
if "%choice%"=="11" "%PY%" memory_optimizer.py start sft --quick
if "%choice%"=="0" exit /b 0
goto menu

:direct
set cmd=%~1
shift
rem every argument after the command (%* would still hold the command, and %1..%9 stop at nine)
set rest=
:collect
if "%~1"=="" goto collected
set rest=%rest% %1
shift
goto collect
:collected
rem each command is a label of its own: %errorlevel% in a ( ) block is read before the block runs, so
rem "exit /b %errorlevel%" there returned 0 whatever Python did; on a line of its own it is Python's code
rem (exit 2 for a user mistake)
for %%c in (demo test start status stop monitor profile config optimize plan watch asr-memory-optimized gru classifier asr lm sft) do if "%cmd%"=="%%c" goto cmd_%cmd%
if /i "%cmd%"=="help" goto usage
if "%cmd%"=="-h" goto usage
if "%cmd%"=="--help" goto usage
echo error: unknown command "%cmd%"; use demo, test, start, status, monitor, stop, profile, config, optimize, plan, watch, gru, classifier, asr, lm, sft or asr-memory-optimized 1>&2
exit /b 2

:usage
echo usage: start_training.bat [COMMAND [flags]]   (no command: the menu; the same words as ./run.sh)
echo   demo ^| test ^| start TRAINER [flags] ^| status ^| monitor [RUN] ^| stop [RUN]
echo   profile ^| config ^| optimize ^| plan TRAINER ^| watch     memory_optimizer.py commands
echo   gru ^| classifier ^| asr ^| lm ^| sft [flags]           train in the foreground
echo   asr-memory-optimized --train-manifest M.jsonl        the seed's T4 recipe for train_asr.py
exit /b 0

:cmd_demo
rem as ./run.sh demo: stop at the first step that fails (neq 0, not "errorlevel 1": a crash code is negative)
"%PY%" memory_optimizer.py profile
if %errorlevel% neq 0 exit /b %errorlevel%
"%PY%" memory_optimizer.py config
if %errorlevel% neq 0 exit /b %errorlevel%
"%PY%" train_gru.py --quick --out runs\demo %rest%
if %errorlevel% neq 0 exit /b %errorlevel%
"%PY%" train_gru.py --suggest "red run" --category fashion --beam 5 --out runs\demo
if %errorlevel% neq 0 exit /b %errorlevel%
"%PY%" train_gru.py --suggest "samsung " --category electronics --beam 5 --out runs\demo
exit /b %errorlevel%

:cmd_test
"%PY%" -m pip install -q -r requirements-dev.txt
if %errorlevel% neq 0 exit /b %errorlevel%
if not defined OMP_NUM_THREADS set OMP_NUM_THREADS=1
"%PY%" -m pytest -q -n auto --dist loadfile --no-loadscope-reorder -o tmp_path_retention_policy=failed tests %rest%
exit /b %errorlevel%

:cmd_start
:cmd_status
:cmd_stop
:cmd_profile
:cmd_config
:cmd_optimize
:cmd_plan
"%PY%" memory_optimizer.py %cmd% %rest%
exit /b %errorlevel%

:cmd_monitor
rem one run until it ends: RUN, else the newest
"%PY%" memory_optimizer.py monitor --latest %rest%
exit /b %errorlevel%

:cmd_watch
"%PY%" memory_optimizer.py monitor %rest%
exit /b %errorlevel%

:cmd_asr-memory-optimized
rem the seed's run_training_memory_optimized.sh, flag for flag
"%PY%" train_asr.py --batch_size 2 --gradient_accumulation_steps 4 --mixed_precision --d_model 192 --encoder_layers 8 --decoder_layers 4 --empty-cache-every 50 %rest%
exit /b %errorlevel%

:cmd_gru
:cmd_classifier
:cmd_asr
:cmd_lm
:cmd_sft
"%PY%" train_%cmd%.py %rest%
exit /b %errorlevel%
